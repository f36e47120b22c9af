"""OC-CLIP model: values against a literal reference, invariances, losses, checkpointing and configs."""

import copy

import pytest
import torch

from modeling_occlip import OCCLIPConfig, OCCLIPModel
from tests.factories import encode_graphs, example_graphs, random_pixels, tiny_occlip_model
from tests.reference_occlip import reference_logit


@pytest.fixture(scope="module")
def model():
    return tiny_occlip_model(seed=0)


@pytest.fixture(scope="module")
def inputs():
    return dict(pixel_values=random_pixels(4), **encode_graphs(example_graphs()))


def test_default_config_is_vit_b16():
    config = OCCLIPConfig()
    assert (config.vision_config.hidden_size, config.vision_config.patch_size, config.vision_config.image_size) == (
        768,
        16,
        224,
    )
    assert config.text_config.hidden_size == 512 and config.projection_dim == 512
    assert config.binding_config.hidden_size == 768 and config.binding_config.num_hidden_layers == 2
    with torch.device("meta"):
        model = OCCLIPModel(config)
    patches = (224 // 16) ** 2
    assert model.vision_model.embeddings.num_patches == patches == 196
    # CLIP ViT-B/16 has ~149.6M parameters; the binding module and scoring heads add the rest.
    clip_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("binding", "similarity")))
    assert 149_000_000 < clip_params < 150_500_000


def reference_matrix(model, inputs) -> torch.Tensor:
    """`[I, T]` logits from the literal one-pair-at-a-time reference."""
    pixels, num_captions = inputs["pixel_values"], inputs["node_input_ids"].shape[0]
    return torch.stack(
        [torch.stack([reference_logit(model, image, inputs, t) for t in range(num_captions)]) for image in pixels]
    )


def test_binding_initialisation_follows_the_config():
    """transformers skips custom modules without direct parameters; binding layers must still get their init."""
    model = tiny_occlip_model(binding={"initializer_range": 0.05})
    for weight in (
        model.binding.layers[1].q_proj.weight,
        model.binding.layers[0].mlp.fc1.weight,
        model.similarity.subject_mlp.fc1.weight,
    ):
        assert 0.03 < weight.std() < 0.07
    assert model.similarity.log_alpha.item() == 0.0


@torch.no_grad()
def test_batched_scores_match_literal_per_pair_reference(model, inputs):
    logits = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, reference_matrix(model, inputs), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_reference_agreement_with_intermediate_layer_and_heads():
    model = tiny_occlip_model(
        seed=3,
        binding={
            "num_attention_heads": 2,
            "vision_feature_layer": 1,
            "num_hidden_layers": 3,
            "position_frequencies": 3,
        },
    )
    inputs = dict(pixel_values=random_pixels(2, seed=5), **encode_graphs(example_graphs()[:2]))
    logits = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, reference_matrix(model, inputs), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_padding_never_changes_scores(model, inputs):
    base = model(**inputs).logits_per_image
    padded = encode_graphs(example_graphs(), max_nodes=6, max_relations=5)
    # Fill the padded slots with real-looking phrases and in-range indices: the masks alone must exclude them.
    padded["node_input_ids"][:, 3:, :3] = torch.tensor([98, 7, 99])
    padded["node_attention_mask"][:, 3:, :3] = 1
    padded["relation_input_ids"][:, 2:, :3] = torch.tensor([98, 21, 99])
    padded["relation_attention_mask"][:, 2:, :3] = 1
    padded["relation_subject_index"][:, 2:] = 1
    padded["relation_object_index"][:, 2:] = 4
    logits = model(pixel_values=inputs["pixel_values"], **padded).logits_per_image
    torch.testing.assert_close(logits, base, atol=1e-6, rtol=0)


@torch.no_grad()
def test_swapping_subject_and_object_changes_relation_score(inputs):
    model = tiny_occlip_model(seed=0)
    graphs = example_graphs()
    swapped = copy.deepcopy(graphs)
    swapped[0]["relations"] = [(1, [20], 0)]
    a = model(pixel_values=inputs["pixel_values"], **encode_graphs(graphs)).logits_per_image
    b = model(pixel_values=inputs["pixel_values"], **encode_graphs(swapped)).logits_per_image
    assert (a[:, 0] - b[:, 0]).abs().min() > 1e-3  # every image scores the swapped caption differently
    torch.testing.assert_close(a[:, 1:], b[:, 1:])  # other captions untouched
    # Same nodes, so the object terms agree; the difference is entirely in the relation term.
    feats = model.get_image_features(inputs["pixel_values"])
    text_a = model.get_graph_features(**encode_graphs(graphs[:1]))
    text_b = model.get_graph_features(**encode_graphs(swapped[:1]))
    torch.testing.assert_close(text_a.node_embeds, text_b.node_embeds)
    s_a, s_b = model.score(feats, text_a, scale=False), model.score(feats, text_b, scale=False)
    # s = (o1 + o2 + r) / 3 with alpha = beta = 1: the relation terms differ by 3 * (s_a - s_b).
    assert torch.all((s_a - s_b).abs() > 1e-4)


@torch.no_grad()
def test_score_chunking_and_pair_scoring_agree_with_full_grid(inputs):
    model = tiny_occlip_model(seed=1)
    full = model(**inputs).logits_per_image
    model.config.pair_chunk_size = 3  # forces tiles of 1 image x 3 captions, then 1 x 1
    image_features = model.get_image_features(inputs["pixel_values"])
    text_features = model.get_graph_features(**{k: v for k, v in inputs.items() if k != "pixel_values"})
    torch.testing.assert_close(model.score(image_features, text_features), full, atol=1e-6, rtol=1e-6)
    # Image 3 has more pairs than one tile holds, so its pairs are split over rows.
    image_index = torch.tensor([3, 0, 2, 0, 1, 3, 3, 3, 3])
    text_index = torch.tensor([0, 1, 2, 3, 0, 3, 1, 2, 2])
    pairs = model.score_pairs(image_features, text_features, image_index, text_index)
    torch.testing.assert_close(pairs, full[image_index, text_index], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_rerank_reorders_a_global_shortlist(model, inputs):
    image_features = model.get_image_features(inputs["pixel_values"])
    text_features = model.get_graph_features(**{k: v for k, v in inputs.items() if k != "pixel_values"})
    full = model.score(image_features, text_features)  # [I, T]
    global_logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 4.0, 3.0, 2.0], [2.0, 1.0, 4.0, 3.0], [3, 2, 1, 4.0]])
    out = model.rerank(image_features, text_features, global_logits, top_k=2, global_weight=0.5)
    for t in range(4):
        shortlist = global_logits[t].topk(2).indices
        fused = full[shortlist, t] + 0.5 * global_logits[t, shortlist]
        order = fused.argsort(descending=True)
        assert out.indices[t].tolist() == shortlist[order].tolist()
        torch.testing.assert_close(out.scores[t], fused[order], atol=1e-5, rtol=1e-5)
    by_image = model.rerank(image_features, text_features, full, top_k=4, query="image")
    assert by_image.indices.tolist() == full.argsort(dim=1, descending=True).tolist()


def test_relation_negatives_known_answer(model):
    graphs = [
        {"nodes": [[1, 10], [2, 11], [3, 12]], "relations": [(0, [20], 1), (2, [21], 0)]},
        {"nodes": [[1, 10], [2, 11]], "relations": [(0, [22], 1), (1, [22], 0)]},  # symmetric, stated both ways
        {"nodes": [[1, 10]], "relations": []},
    ]
    with torch.no_grad():
        text = model.get_graph_features(**encode_graphs(graphs))
    subjects, objects, valid = model.relation_negatives(text)
    # Graph 0: swap of relation 0, swap of relation 1, node shift by 1, node shift by 2.
    assert subjects[0].tolist()[:4] == [[1, 2], [0, 0], [1, 0], [2, 1]]
    assert objects[0].tolist()[:4] == [[0, 0], [1, 2], [2, 1], [0, 2]]
    assert valid[0].tolist() == [True, True, True, True]
    # Graph 1: every swap or shift reproduces the same two triples, so all are dropped.
    assert valid[1].tolist() == [False] * 4
    assert valid[2].tolist() == [False] * 4


def test_relation_loss_equals_explicit_negative_graphs(model, inputs):
    """L_rel computed internally equals InfoNCE over negatives fed to the model as ordinary graphs."""
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
        text = out.graph_features
        subjects, objects, valid = model.relation_negatives(text)
        losses = []
        graph_inputs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        for b in range(4):
            if not valid[b].any():
                continue
            candidates = [(text.relation_subject_index[b], text.relation_object_index[b])]
            candidates += [(subjects[b, k], objects[b, k]) for k in range(valid.shape[1]) if valid[b, k]]
            logits = []
            for subj, obj in candidates:
                g = {k: v[b : b + 1].clone() for k, v in graph_inputs.items()}
                g["relation_subject_index"][0], g["relation_object_index"][0] = subj, obj
                feats = model.get_image_features(inputs["pixel_values"][b : b + 1])
                logits.append(model.score(feats, model.get_graph_features(**g))[0, 0])
            logits = torch.stack(logits)
            losses.append(-logits.log_softmax(0)[0])
        torch.testing.assert_close(out.loss_rel, torch.stack(losses).mean(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, out.loss_itc + model.config.rel_loss_weight * out.loss_rel)


def test_itc_loss_is_symmetric_cross_entropy(model, inputs):
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
    labels = torch.arange(4)
    ce = torch.nn.functional.cross_entropy
    expected = 0.5 * (ce(out.logits_per_image, labels) + ce(out.logits_per_text, labels))
    torch.testing.assert_close(out.loss_itc, expected)


def test_loss_decreases_on_tiny_overfit_batch(inputs):
    model = tiny_occlip_model(seed=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(60):
        out = model(**inputs, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.loss_itc.item(), out.loss_rel.item()))
    (itc0, rel0), (itc1, rel1) = history[0], history[-1]
    assert itc1 < 0.1 * itc0 and rel1 < 0.1 * rel0, history[::10]
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.argmax(dim=1).tolist() == [0, 1, 2, 3]


def test_gradient_checkpointing_gives_identical_gradients(inputs):
    def grads(enable: bool):
        model = tiny_occlip_model(seed=4).train()
        if enable:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.binding.layers)
        model(**inputs, return_loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert plain["binding.layers.0.q_proj.weight"].abs().sum() > 0


def test_slot_residual_from_query_option_changes_slots(inputs):
    base = tiny_occlip_model(seed=5)
    residual = tiny_occlip_model(seed=5, binding={"slot_residual_from_query": True})
    residual.load_state_dict(base.state_dict())
    with torch.no_grad():
        a, b = base(**inputs).logits_per_image, residual(**inputs).logits_per_image
    assert not torch.allclose(a, b)


def test_patch_position_features_known_values():
    from modeling_occlip.binding_occlip import patch_position_features

    features = patch_position_features(4, 1, "cpu", torch.float32)  # 2 x 2 grid, centres at -0.5 and 0.5
    s, c = torch.sin(torch.tensor(torch.pi * 0.5)), torch.cos(torch.tensor(torch.pi * 0.5))
    expected = torch.tensor(
        [
            [-0.5, -0.5, -s, -s, c, c],  # top-left: x, y, sin(pi x), sin(pi y), cos(pi x), cos(pi y)
            [0.5, -0.5, s, -s, c, c],
            [-0.5, 0.5, -s, s, c, c],
            [0.5, 0.5, s, s, c, c],
        ]
    )
    torch.testing.assert_close(features, expected)
    with pytest.raises(ValueError, match="square patch grid"):
        patch_position_features(6, 0, "cpu", torch.float32)


def test_binding_init_default_scales_with_width():
    """Default `initializer_range` is 1.7 / sqrt(binding width); no position adds no parameter."""
    model = tiny_occlip_model(binding={"initializer_range": None, "position_frequencies": -1})
    width = model.config.binding_width
    std = float(model.binding.layers[0].q_proj.weight.detach().std())
    assert abs(std - 1.7 / width**0.5) < 0.25 * 1.7 / width**0.5
    assert model.binding.position_proj is None
