"""CLOC: CLIP parity after from_clip, save/load and remote code without the package, checkpointing parity."""

import pytest
import torch
from transformers import AutoModel

from modeling_cloc import CLOCModel
from tests.factories import random_pixels, tiny_clip_model, tiny_cloc_model
from tests.isolated_python import run_isolated

BOXES = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]], [[0.5, 0.2, 0.9, 0.9], [0.3, 0.3, 0.6, 0.7]]])
IDS = torch.tensor([[98, 5, 6, 99], [98, 7, 99, 0]])


@torch.no_grad()
def test_from_clip_towers_match_clip_exactly(tmp_path):
    clip = tiny_clip_model(seed=3)
    clip.save_pretrained(tmp_path / "clip")
    pixels = random_pixels(2)
    for source in (clip, tmp_path / "clip"):
        model = CLOCModel.from_clip(source).eval()
        torch.testing.assert_close(
            model.get_image_features(pixels).pooler_output,
            clip.get_image_features(pixels).pooler_output,
            atol=0,
            rtol=0,
        )
        torch.testing.assert_close(
            model.get_text_features(IDS).pooler_output, clip.get_text_features(IDS).pooler_output, atol=0, rtol=0
        )
        out, ref = model(input_ids=IDS, pixel_values=pixels), clip(input_ids=IDS, pixel_values=pixels)
        torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=1e-6, rtol=1e-6)
        # Warm start: the region embedding's output LN and projection are CLIP's post-LN and visual projection.
        torch.testing.assert_close(model.prompter.projection.weight, clip.visual_projection.weight)
        torch.testing.assert_close(model.prompter.post_layernorm.weight, clip.vision_model.post_layernorm.weight)


@pytest.mark.slow
@torch.no_grad()
def test_round_trip_and_remote_code_in_clean_venv(clean_python, tmp_path):
    model = tiny_cloc_model(seed=2)
    folder = tmp_path / "cloc"
    model.save_pretrained(folder)
    pixels = random_pixels(2, seed=1)
    torch.save({"pixel_values": pixels, "boxes": BOXES}, folder / "inputs.pt")
    expected = model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds
    loaded = AutoModel.from_pretrained(folder)
    assert isinstance(loaded, CLOCModel)
    torch.testing.assert_close(
        loaded.eval().get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds,
        expected,
        atol=0,
        rtol=0,
    )
    run_isolated(
        clean_python,
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(folder / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model.get_region_features(pixel_values=inputs["pixel_values"], input_boxes=inputs["boxes"]).region_embeds, "out.pt")
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, atol=0, rtol=0)


def test_gradient_checkpointing_gives_identical_gradients():
    region_ids = torch.tensor([[[98, 7, 99], [98, 8, 99]], [[98, 9, 99], [98, 10, 99]]])
    inputs = dict(input_ids=IDS, pixel_values=random_pixels(2, seed=2), input_boxes=BOXES, region_input_ids=region_ids)

    def grads(enable: bool):
        model = tiny_cloc_model(seed=4).train()
        if enable:
            model.activation_checkpointing_enable()
        model(**inputs, return_loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and "prompter.layers.0.q_proj.weight" in plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


@torch.no_grad()
def test_zero_shot_pipeline_uses_clip_logits():
    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessorPil, pipeline

    from modeling_cloc import CLOCConfig
    from processing import bundled_clip_tokenizer
    from tests.factories import clip_vocab_text_config, tiny_vision_config

    torch.manual_seed(0)
    text = clip_vocab_text_config(max_position_embeddings=77)
    model = CLOCModel(CLOCConfig(text_config=text, vision_config=tiny_vision_config(), projection_dim=24)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = bundled_clip_tokenizer()
    classifier = pipeline(
        "zero-shot-image-classification", model=model, image_processor=image_processor, tokenizer=tokenizer
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    labels = ["cat", "dog", "red car"]
    result = {r["label"]: r["score"] for r in classifier(image, candidate_labels=labels)}
    texts = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
    pixels = image_processor(image, return_tensors="pt")["pixel_values"]
    probs = model(pixel_values=pixels, **texts).logits_per_image.softmax(-1)[0]
    torch.testing.assert_close(torch.tensor([result[label] for label in labels]), probs, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_zero_shot_pipeline_loads_a_saved_folder_with_remote_code_only(clean_python, tmp_path):
    """`auto_map` names AutoModelForZeroShotImageClassification: the pipeline runs without the package."""
    import json

    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from modeling_cloc import CLOCConfig
    from processing import CLOCProcessor, bundled_clip_tokenizer
    from tests.factories import clip_vocab_text_config, tiny_vision_config

    torch.manual_seed(0)
    text = clip_vocab_text_config(max_position_embeddings=77)
    model = CLOCModel(CLOCConfig(text_config=text, vision_config=tiny_vision_config(), projection_dim=24)).eval()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLOCProcessor(image_processor=image_processor, tokenizer=bundled_clip_tokenizer())
    folder = tmp_path / "cloc"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForZeroShotImageClassification"] == "modeling_cloc.CLOCModel"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    labels = ["cat", "dog", "red car"]
    run_isolated(
        clean_python,
        f"""
        import json
        from transformers import pipeline
        classifier = pipeline("zero-shot-image-classification", model={str(folder)!r}, trust_remote_code=True)
        assert type(classifier.model).__module__.startswith("transformers_modules"), type(classifier.model).__module__
        result = classifier({str(tmp_path / "image.png")!r}, candidate_labels={labels!r})
        json.dump({{r["label"]: r["score"] for r in result}}, open("scores.json", "w"))
        """,
        tmp_path,
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    texts = processor.tokenizer(
        [f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt"
    )
    pixels = image_processor(Image.open(tmp_path / "image.png"), return_tensors="pt")["pixel_values"]
    probs = model(pixel_values=pixels, **texts).logits_per_image.softmax(-1)[0]
    torch.testing.assert_close(torch.tensor([scores[label] for label in labels]), probs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_full_image_box_and_image_embedding_share_the_output_head_but_are_not_tied():
    """Spec: the two are not tied (CLS vs Prompter pooling), but from CLIP the Prompter's output LN + projection
    are CLIP's, so the CLS state through the Prompter head gives exactly the image embedding."""
    clip = tiny_clip_model(seed=5)
    model = CLOCModel.from_clip(clip).eval()
    pixels = random_pixels(2, seed=6)
    tokens = model.get_image_features(pixels).last_hidden_state
    image = torch.nn.functional.normalize(model.get_image_features(pixels).pooler_output, dim=-1)
    through_head = model.prompter.projection(model.prompter.post_layernorm(tokens[:, 0]))
    torch.testing.assert_close(torch.nn.functional.normalize(through_head, dim=-1), image, atol=1e-6, rtol=1e-6)
    full_box = model.get_region_features(
        image_tokens=tokens, input_boxes=torch.tensor([[[0.0, 0.0, 1.0, 1.0]]] * 2)
    ).region_embeds[:, 0]
    assert not torch.allclose(full_box, image, atol=1e-3)
    assert torch.allclose(full_box.norm(dim=-1), torch.ones(2))  # same joint space: unit vectors of width D
