"""Tiny-config factories and input builders shared by every test (no download, CPU-fast)."""

import torch
from transformers import CLIPConfig, CLIPModel

VOCAB_SIZE = 100
PAD_ID, BOS_ID, EOS_ID = 0, 98, 99


def tiny_text_config(**overrides) -> dict:
    """Text tower: width 32, 2 layers, 4 heads; bos/eos/pad inside the 100-token vocabulary."""
    config = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=24,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    config.update(overrides)
    return config


def clip_vocab_text_config(**overrides) -> dict:
    """The tiny text tower over the real CLIP vocabulary, for tests that tokenize with the bundled tokenizer."""
    return tiny_text_config(vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **overrides)


def tiny_vision_config(**overrides) -> dict:
    """Vision tower: width 32, 2 layers, 4 heads, 32 px images, patch 8 (16 patches)."""
    config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    )
    config.update(overrides)
    return config


def tiny_binding_config(**overrides) -> dict:
    """Binding module: width 16, 2 layers, 1 head, 2 default queries, small score heads.

    The init scale is raised with the width shrunk (0.2 at width 16 is ~0.02 at width 768 in logit terms),
    so that slots of different nodes already differ at initialisation, as at full size.
    """
    config = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_default_queries=2,
        object_score_dim=12,
        relation_score_dim=12,
        initializer_range=0.2,
    )
    config.update(overrides)
    return config


def tiny_occlip_config(binding=None, text=None, vision=None, **overrides):
    """A tiny `OCCLIPConfig`; keyword dicts override sub-config fields, other kwargs top-level fields."""
    from modeling_occlip import OCCLIPConfig

    return OCCLIPConfig(
        text_config=tiny_text_config(**(text or {})),
        vision_config=tiny_vision_config(**(vision or {})),
        binding_config=tiny_binding_config(**(binding or {})),
        projection_dim=24,
        **overrides,
    )


def tiny_occlip_model(seed: int = 0, **config_overrides):
    """A randomly initialised tiny `OCCLIPModel` in eval mode (deterministic for a seed)."""
    from modeling_occlip import OCCLIPModel

    torch.manual_seed(seed)
    return OCCLIPModel(tiny_occlip_config(**config_overrides)).eval()


def tiny_clip_model(seed: int = 0) -> CLIPModel:
    """A randomly initialised tiny transformers `CLIPModel` with the same tower sizes as the OC-CLIP factory."""
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    return CLIPModel(config).eval()


def random_pixels(batch: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Normalised-looking random images `[batch, 3, size, size]`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def phrase_tokens(words: list[int], length: int) -> list[int]:
    """`bos + words + eos`, right-padded with the pad id to `length`."""
    tokens = [BOS_ID, *words, EOS_ID]
    if len(tokens) > length:
        raise ValueError(f"phrase of {len(tokens)} tokens does not fit length {length}")
    return tokens + [PAD_ID] * (length - len(tokens))


def encode_graphs(graphs: list[dict], max_nodes: int | None = None, max_relations: int | None = None, length: int = 6):
    """Pad toy scene graphs into `OCCLIPModel` inputs.

    A graph is `{"nodes": [[word ids], ...], "relations": [(subject, [word ids], object), ...]}` with word ids
    in `[1, 97]`.
    """
    num_nodes = max_nodes or max(len(g["nodes"]) for g in graphs)
    num_relations = max_relations if max_relations is not None else max(len(g["relations"]) for g in graphs)
    batch = len(graphs)
    node_ids = torch.full((batch, num_nodes, length), PAD_ID, dtype=torch.long)
    relation_ids = torch.full((batch, num_relations, length), PAD_ID, dtype=torch.long)
    node_mask = torch.zeros(batch, num_nodes, dtype=torch.bool)
    relation_mask = torch.zeros(batch, num_relations, dtype=torch.bool)
    subject = torch.zeros(batch, num_relations, dtype=torch.long)
    obj = torch.zeros(batch, num_relations, dtype=torch.long)
    for b, graph in enumerate(graphs):
        for m, words in enumerate(graph["nodes"]):
            node_ids[b, m] = torch.tensor(phrase_tokens(words, length))
            node_mask[b, m] = True
        for p, (s, words, o) in enumerate(graph["relations"]):
            relation_ids[b, p] = torch.tensor(phrase_tokens(words, length))
            relation_mask[b, p] = True
            subject[b, p], obj[b, p] = s, o
    return dict(
        node_input_ids=node_ids,
        node_attention_mask=(node_ids != PAD_ID).long(),
        node_mask=node_mask,
        relation_input_ids=relation_ids,
        relation_attention_mask=(relation_ids != PAD_ID).long(),
        relation_mask=relation_mask,
        relation_subject_index=subject,
        relation_object_index=obj,
    )


def example_graphs() -> list[dict]:
    """Four small graphs with 1-3 nodes and 0-2 relations (word ids stand for colours, shapes, predicates)."""
    red, blue, green, cube, sphere, cone, left_of, above = 1, 2, 3, 10, 11, 12, 20, 21
    return [
        {"nodes": [[red, cube], [blue, sphere]], "relations": [(0, [left_of], 1)]},
        {"nodes": [[blue, cube], [red, sphere], [green, cone]], "relations": [(0, [above], 2), (1, [left_of], 0)]},
        {"nodes": [[green, sphere]], "relations": []},
        {"nodes": [[red, cone], [green, cube]], "relations": [(1, [above], 0)]},
    ]


def tiny_cloc_model(seed: int = 0, **prompter_overrides):
    """A randomly initialised tiny `CLOCModel` (towers as the OC-CLIP factory) in eval mode."""
    from modeling_cloc import CLOCConfig, CLOCModel

    torch.manual_seed(seed)
    config = CLOCConfig(
        text_config=tiny_text_config(),
        vision_config=tiny_vision_config(),
        prompter_config={"initializer_range": 0.2, **prompter_overrides},
        projection_dim=24,
    )
    return CLOCModel(config).eval()
