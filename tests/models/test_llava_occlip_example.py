"""`training/llava_occlip.py`: an OC-CLIP image tower exported as a stock CLIP tower inside a tiny LLaVA model, saved,
and reloaded by transformers alone (no package import) with OC-CLIP's image features and image processing."""

import json

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from processing import OCCLIPProcessor
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import tiny_occlip_model
from training import llava_cloc, llava_occlip

# Not CLIP's statistics: the exported tower must carry OC-CLIP's own image processing, not a default.
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_occlip")
    occlip = tiny_occlip_model(seed=3)
    occlip.save_pretrained(root / "occlip")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN, image_std=STD
    )
    OCCLIPProcessor(image_processor).save_pretrained(root / "occlip")
    tokenizer = bundled_clip_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    return root, occlip


@pytest.mark.slow
@torch.no_grad()
def test_saved_llava_with_an_occlip_tower_loads_in_stock_transformers(folders, tmp_path, clean_python, capsys):
    from tests.isolated_python import run_isolated

    root, occlip = folders
    out = tmp_path / "llava"
    argv = ["--occlip_model", str(root / "occlip"), "--language_model", str(root / "lm"), "--max_new_tokens", "4"]
    answers = llava_occlip.main([*argv, "--output_dir", str(out)])
    assert answers["image_answer"] in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert "auto_map" not in config and "auto_map" not in config["vision_config"] and not list(out.glob("*.py"))
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    saved_vocab = LlavaProcessor.from_pretrained(out).tokenizer.get_vocab()
    assert llava_cloc.IMAGE_TOKEN in saved_vocab and llava_cloc.REGION_TOKEN not in saved_vocab  # no region path
    image, _ = llava_cloc.drawn_scene()
    image.save(tmp_path / "scene.png")
    # Reference: the OC-CLIP model's own processor and image tower.
    pixels = OCCLIPProcessor.from_pretrained(root / "occlip")(images=image)["pixel_values"]
    expected = occlip.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    run_isolated(
        clean_python,
        f"""
        import torch
        from PIL import Image
        from transformers import CLIPImageProcessor, CLIPVisionModel, LlavaForConditionalGeneration, LlavaProcessor
        image = Image.open({str(tmp_path / "scene.png")!r}).convert("RGB")
        for remote in (False, True):
            llava, info = LlavaForConditionalGeneration.from_pretrained(
                {str(out)!r}, trust_remote_code=remote, output_loading_info=True
            )
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            assert type(llava.model.vision_tower) is CLIPVisionModel, type(llava.model.vision_tower)
        llava.eval()
        pixels = LlavaProcessor.from_pretrained({str(out)!r})(
            images=image, text="<image>", return_tensors="pt"
        )["pixel_values"]
        # original LLaVA's route: the tower folder alone, through CLIPVisionModel / CLIPImageProcessor
        tower_dir = {str(out / llava_occlip.TOWER_DIR)!r}
        tower_pixels = CLIPImageProcessor.from_pretrained(tower_dir)(images=image, return_tensors="pt")["pixel_values"]
        tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
        with torch.no_grad():
            features = llava.model.get_image_features(
                pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ).pooler_output[0]
            torch.save({{
                "pixels": pixels,
                "tower_pixels": tower_pixels,
                "hidden": llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2],
                "tower_hidden": tower(tower_pixels, output_hidden_states=True).hidden_states[-2],
                "features": features,
            }}, "out.pt")
        """,
        tmp_path,
    )
    isolated = torch.load(tmp_path / "out.pt")
    for name in ("pixels", "tower_pixels"):
        torch.testing.assert_close(isolated[name], pixels, atol=1e-6, rtol=0)
    for name in ("hidden", "tower_hidden"):
        torch.testing.assert_close(isolated[name], expected, atol=1e-5, rtol=0)
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    projected = reloaded.model.multi_modal_projector(expected[:, 1:])[0]
    torch.testing.assert_close(isolated["features"], projected, atol=1e-5, rtol=0)
    # The reloaded model answers as the in-memory one did (greedy).
    inputs = LlavaProcessor.from_pretrained(out)(
        images=image, text="<image>\nDescribe the image.", return_tensors="pt"
    )
    generated = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == answers["image_answer"]


@pytest.mark.parametrize("where", ["occlip", "occlip/sub", "lm", "."])
def test_output_dir_overlapping_an_input_model_is_refused_before_any_write(folders, where):
    root, _ = folders
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    output = root / where
    with pytest.raises(ValueError, match="overwrite the input model"):
        llava_occlip.main(
            ["--occlip_model", str(root / "occlip"), "--language_model", str(root / "lm"), "--output_dir", str(output)]
        )
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before
    assert not (root / "occlip" / "sub").exists()
