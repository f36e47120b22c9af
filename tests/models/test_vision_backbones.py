"""CLOC's and OC-CLIP's image towers as MLLM vision backbones: LLaVA (forward, loss, generate, save/reload) and
the plain `CLIPVisionModel` export that original-LLaVA code loads."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import modeling_cloc  # noqa: F401  (registers the CLOC vision config for LlavaConfig / AutoModel)
import modeling_occlip  # noqa: F401
from modeling_cloc import CLOCVisionConfig, CLOCVisionModel
from modeling_occlip import OCCLIPVisionConfig, OCCLIPVisionModel
from tests.factories import random_pixels, tiny_cloc_model, tiny_occlip_model, tiny_vision_config

IMAGE_TOKEN = 90


def tiny_llava(vision_config) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=16
    )
    return LlavaForConditionalGeneration(config).eval()


def llava_inputs():
    # 32 px images with patch 8: 16 patch features per image ("default" drops CLS) -> 16 image tokens.
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * 16 + [7, 8]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=random_pixels(1, seed=9))


@pytest.mark.parametrize("config_class", [CLOCVisionConfig, OCCLIPVisionConfig])
def test_llava_with_our_vision_tower(config_class, tmp_path):
    model = tiny_llava(config_class(**tiny_vision_config()))
    tower_class = CLOCVisionModel if config_class is CLOCVisionConfig else OCCLIPVisionModel
    assert isinstance(model.model.vision_tower, tower_class)
    inputs = llava_inputs()
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
        assert out.logits.shape == (1, 21, 100) and torch.isfinite(out.loss)
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 25)
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=4, do_sample=False), generated)
        torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


@torch.no_grad()
def test_towers_from_full_checkpoints_export_to_clip_vision_model(tmp_path):
    pixels = random_pixels(2, seed=3)
    cloc, occlip = tiny_cloc_model(seed=1), tiny_occlip_model(seed=1)
    cloc.save_pretrained(tmp_path / "cloc")
    occlip.save_pretrained(tmp_path / "occlip")
    for folder, full, tower_class in (("cloc", cloc, CLOCVisionModel), ("occlip", occlip, OCCLIPVisionModel)):
        tower = tower_class.from_pretrained(tmp_path / folder).eval()
        expected = full.vision_model(pixels, output_hidden_states=True)
        got = tower(pixels, output_hidden_states=True)
        assert len(got.hidden_states) == tower.config.num_hidden_layers + 1
        for a, b in zip(got.hidden_states, expected.hidden_states):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        tower.export_clip_vision(tmp_path / f"export_{folder}")
        clip = CLIPVisionModel.from_pretrained(tmp_path / f"export_{folder}").eval()
        assert clip.config.model_type == "clip_vision_model"
        exported = clip(pixels, output_hidden_states=True)
        for a, b in zip(exported.hidden_states, expected.hidden_states):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        # Original LLaVA reads the tower's preprocessing with no extra argument.
        processor = CLIPImageProcessor.from_pretrained(tmp_path / f"export_{folder}")
        assert processor.crop_size == {"height": 32, "width": 32} and processor.size == {"shortest_edge": 32}
        assert list(processor.image_mean) == list(OPENAI_CLIP_MEAN) and list(processor.image_std) == list(
            OPENAI_CLIP_STD
        )
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
        assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


@torch.no_grad()
def test_cloc_tower_boxes_give_the_full_models_region_outputs(tmp_path):
    """Ferret-style `input_boxes=`: the tower from a full CLOC folder gives CLOCModel's region hidden states/embeds."""
    pixels = random_pixels(2, seed=6)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8]], [[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]]])
    mask = torch.tensor([[True, True], [True, False]])
    cloc = tiny_cloc_model(seed=4)
    cloc.save_pretrained(tmp_path / "cloc")
    tower = CLOCVisionModel.from_pretrained(tmp_path / "cloc").eval()
    out = tower(pixels, input_boxes=boxes, box_mask=mask, output_hidden_states=True)
    tokens = cloc.get_image_tokens(pixels)
    hidden, _ = cloc.prompter(cloc.prompter.box_prompts(boxes), tokens, boxes)  # box prompts get the box bias
    torch.testing.assert_close(out.region_hidden_states, hidden * mask[..., None], atol=1e-6, rtol=1e-6)
    expected = cloc.get_region_features(pixel_values=pixels, input_boxes=boxes, box_mask=mask).region_embeds
    torch.testing.assert_close(out.region_embeds, expected, atol=1e-6, rtol=1e-6)
    assert torch.all(out.region_embeds[1, 1] == 0) and len(out.hidden_states) == 3
    as_tuple = tower(pixels, input_boxes=boxes, return_dict=False)
    torch.testing.assert_close(as_tuple[-1], tower(pixels, input_boxes=boxes).region_embeds)
    with pytest.raises(ValueError, match="image 0, box 1"):
        tower(pixels, input_boxes=torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.6, 0.1, 0.2, 0.5]]] * 2))

    # Saved on its own (prompter included) and reloaded; without a Prompter, boxes are refused by name.
    tower.save_pretrained(tmp_path / "tower")
    again = CLOCVisionModel.from_pretrained(tmp_path / "tower").eval()
    torch.testing.assert_close(
        again(pixels, input_boxes=boxes).region_embeds, tower(pixels, input_boxes=boxes).region_embeds
    )
    plain = CLOCVisionModel(CLOCVisionConfig(**tiny_vision_config()))
    assert plain.prompter is None
    with pytest.raises(ValueError, match="no Prompter"):
        plain(pixels, input_boxes=boxes)


def test_llava_keeps_the_cloc_prompter_through_save_and_reload(tmp_path):
    config = CLOCVisionConfig(**tiny_vision_config(), prompter_config={"initializer_range": 0.2})
    model = tiny_llava(config)
    prompter = model.model.vision_tower.prompter
    assert prompter is not None and prompter.layers[0].fc1.weight.std() > 0.1  # initialised from prompter_config
    model.save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    boxes = torch.tensor([[[0.1, 0.2, 0.6, 0.9]]])
    pixels = random_pixels(1, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.model.vision_tower(pixels, input_boxes=boxes).region_hidden_states,
            model.model.vision_tower(pixels, input_boxes=boxes).region_hidden_states,
            atol=0,
            rtol=0,
        )
