"""CLOC's and OC-CLIP's image towers as MLLM vision backbones: LLaVA (forward, loss, generate, save/reload) and
the plain `CLIPVisionModel` export that original-LLaVA code loads."""

import pytest
import torch
from transformers import CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
