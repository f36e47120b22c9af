"""`training/llava_cloc.py` with tiny random CLOC and Llama folders: weights carried into LLaVA, the region-token
path inserts the projected Prompter state, generation is LLaVA's greedy answer, and the saved model reloads."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from modeling_cloc import CLOCVisionConfig
from processing import CLOCProcessor
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import tiny_cloc_model
from training import llava_cloc


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_cloc")
    cloc = tiny_cloc_model(seed=2)
    cloc.save_pretrained(root / "cloc")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLOCProcessor(image_processor).save_pretrained(root / "cloc")
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
    return root, cloc


@torch.no_grad()
def test_build_llava_carries_tower_and_language_model(folders):
    root, cloc = folders
    lm = AutoModelForCausalLM.from_pretrained(root / "lm").eval()
    tower = llava_cloc.CLOCVisionModel.from_pretrained(root / "cloc")
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    image_processor = CLOCProcessor.from_pretrained(root / "cloc").image_processor
    llava, processor = llava_cloc.build_llava(tower, lm, tokenizer, image_processor)
    text_ids = tokenizer(["a red square on grey"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(llava(input_ids=text_ids).logits[..., : lm.config.vocab_size], lm(text_ids).logits)
    image, box = llava_cloc.drawn_scene()
    inputs = processor(images=image, text="<image>\nwhat is this?", return_tensors="pt")
    assert (inputs["input_ids"] == llava.config.image_token_id).sum() == 16  # (32 / 8)^2 patches, CLS dropped
    pixels = inputs["pixel_values"]
    expected = cloc.vision_model(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    features = llava.model.get_image_features(
        pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
    )
    torch.testing.assert_close(features.pooler_output[0], llava.model.multi_modal_projector(expected)[0])

    # Region-token path: the <region> embedding is the projected Prompter state of the box; the rest is unchanged.
    region_id = tokenizer.convert_tokens_to_ids(llava_cloc.REGION_TOKEN)
    inputs = processor(images=image, text="<image>\nwhat is in <region>?", return_tensors="pt")
    boxes = CLOCProcessor.from_pretrained(root / "cloc")(images=image, input_boxes=[[box]])["input_boxes"]
    embeds = llava_cloc.region_inputs_embeds(llava, inputs["input_ids"], pixels, boxes, region_id)
    tokens = cloc.get_image_tokens(pixels)
    hidden, _ = cloc.prompter(cloc.prompter.box_prompts(boxes), tokens, boxes)
    is_region = inputs["input_ids"][0] == region_id
    torch.testing.assert_close(embeds[0, is_region], llava.model.multi_modal_projector(hidden)[0])
    plain = llava.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(embeds[0, ~is_region], plain[0, ~is_region], atol=0, rtol=0)
    # Greedy generation's first token is the argmax of LLaVA's logits on these embeddings (image merged in).
    logits = llava(inputs_embeds=embeds, pixel_values=pixels, attention_mask=inputs["attention_mask"]).logits
    generated = llava.generate(inputs_embeds=embeds, pixel_values=pixels, max_new_tokens=1, do_sample=False)
    assert generated[0, -1] == logits[0, -1].argmax()
    other = torch.tensor([[[0.5, 0.5, 1.0, 1.0]]])
    assert not torch.allclose(
        llava_cloc.region_inputs_embeds(llava, inputs["input_ids"], pixels, other, region_id)[0, is_region],
        embeds[0, is_region],
    )
    with pytest.raises(ValueError, match="one <region> per box"):
        llava_cloc.region_inputs_embeds(llava, inputs["input_ids"], pixels, boxes.repeat(1, 2, 1), region_id)


def test_example_runs_and_its_saved_llava_reloads(folders, tmp_path, capsys):
    root, _ = folders
    argv = ["--cloc_model", str(root / "cloc"), "--language-model", str(root / "lm"), "--max_new_tokens", "5"]
    answers = llava_cloc.main([*argv, "--output_dir", str(tmp_path / "llava")])
    printed = capsys.readouterr().out
    assert answers["image_answer"] in printed and answers["region_answer"] in printed
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    processor = LlavaProcessor.from_pretrained(tmp_path / "llava")
    image, _ = llava_cloc.drawn_scene()
    inputs = processor(images=image, text="<image>\nDescribe the image.", return_tensors="pt")
    with torch.no_grad():
        generated = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False)
    # Decoded with the LM's own tokenizer: AutoTokenizer in a llava folder picks a generic class for CLIP's BPE.
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer == answers["image_answer"]
    with pytest.raises(ValueError, match="one <region> per box"):
        llava_cloc.main([*argv, "--box", "1", "2", "30", "40", "5", "6", "50", "60"])
    with pytest.raises(ValueError, match="multiple of 4|x0 y0 x1 y1"):
        llava_cloc.main([*argv, "--box", "1", "2", "30"])


@pytest.mark.slow
@torch.no_grad()
def test_output_dir_loads_in_stock_transformers_and_side_car_restores_regions(folders, tmp_path, clean_python):
    """`--output_dir` is the supported route: stock transformers loads it without the package, its image features
    are CLOC's, and the side-car Prompter gives back CLOC's region outputs."""
    from tests.isolated_python import run_isolated

    root, cloc = folders
    out = tmp_path / "llava"
    argv = ["--cloc_model", str(root / "cloc"), "--language_model", str(root / "lm"), "--max_new_tokens", "2"]
    llava_cloc.main([*argv, "--output_dir", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "clip_vision_model" and "prompter_config" not in config
    assert "auto_map" not in config and "auto_map" not in config["vision_config"]
    assert not list(out.glob("*.py"))  # nothing for trust_remote_code to run
    image, box = llava_cloc.drawn_scene()
    pixels = LlavaProcessor.from_pretrained(out)(images=image, text="<image>", return_tensors="pt")["pixel_values"]
    torch.save(pixels, tmp_path / "pixels.pt")
    run_isolated(
        clean_python,
        f"""
        import torch
        from transformers import CLIPVisionModel, LlavaForConditionalGeneration
        pixels = torch.load({str(tmp_path / "pixels.pt")!r})
        for remote in (False, True):
            llava, info = LlavaForConditionalGeneration.from_pretrained(
                {str(out)!r}, trust_remote_code=remote, output_loading_info=True
            )
            assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
            assert type(llava.model.vision_tower) is CLIPVisionModel, type(llava.model.vision_tower)
        llava.eval()
        with torch.no_grad():
            hidden = llava.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
            features = llava.model.get_image_features(
                pixels, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ).pooler_output[0]
        torch.save({{"hidden": hidden, "features": features}}, "out.pt")
        """,
        tmp_path,
    )
    isolated = torch.load(tmp_path / "out.pt")
    expected = cloc.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(isolated["hidden"], expected, atol=1e-5, rtol=0)
    reloaded = llava_cloc.load_llava_with_prompter(out).eval()
    projected = reloaded.model.multi_modal_projector(expected[:, 1:])[0]
    torch.testing.assert_close(isolated["features"], projected, atol=1e-5, rtol=0)

    # The side-car Prompter on the stock tower reproduces CLOC's region hidden states and embeddings.
    boxes = CLOCProcessor.from_pretrained(root / "cloc")(images=image, input_boxes=[[box, [2.0, 3.0, 60.0, 90.0]]])[
        "input_boxes"
    ]
    regions = reloaded.model.vision_tower(pixels, input_boxes=boxes)
    torch.testing.assert_close(
        regions.region_embeds,
        cloc.get_region_features(pixel_values=pixels, input_boxes=boxes).region_embeds,
        atol=1e-5,
        rtol=0,
    )
    hidden, _ = cloc.prompter(cloc.prompter.box_prompts(boxes), cloc.get_image_tokens(pixels), boxes)
    torch.testing.assert_close(regions.region_hidden_states, hidden, atol=1e-5, rtol=0)
    assert not torch.allclose(regions.region_embeds[0, 0], regions.region_embeds[0, 1])


def test_prompter_side_car_errors(folders, tmp_path):
    root, cloc = folders
    tower = llava_cloc.CLOCVisionModel.from_pretrained(root / "cloc")
    with pytest.raises(FileNotFoundError, match="not a Prompter side-car"):
        llava_cloc.CLOCVisionModel.attach_prompter(tower, tmp_path)
    tower.save_prompter(tmp_path / "prompter")
    clip = CLIPVisionModel(tower.clip_vision_config())
    clip.load_state_dict(tower.clip_state_dict())
    attached = llava_cloc.CLOCVisionModel.attach_prompter(clip, tmp_path / "prompter")
    for name, value in tower.state_dict().items():
        torch.testing.assert_close(attached.state_dict()[name], value, atol=0, rtol=0)
    wider = CLIPVisionConfig(**{**tower.clip_vision_config().to_dict(), "hidden_size": 64, "intermediate_size": 64})
    with pytest.raises(ValueError, match="different towers"):
        llava_cloc.CLOCVisionModel.attach_prompter(CLIPVisionModel(wider), tmp_path / "prompter")
    fields = {k: v for k, v in tower.config.to_dict().items() if k not in ("model_type", "prompter_config")}
    bare = llava_cloc.CLOCVisionModel(CLOCVisionConfig(**fields))
    with pytest.raises(ValueError, match="no Prompter to save"):
        bare.save_prompter(tmp_path / "none")


@pytest.mark.slow
def test_llava_with_cloc_tower_needs_the_package_which_is_why_output_dir_exports(folders, tmp_path, clean_python):
    """The plain save of a CLOC-tower LLaVA fails without the package even with trust_remote_code (transformers
    resolves LLaVA's vision_config through its static table); if this ever loads, the side-car route can go."""
    from tests.isolated_python import run_isolated

    root, _ = folders
    tower = llava_cloc.CLOCVisionModel.from_pretrained(root / "cloc")
    lm = AutoModelForCausalLM.from_pretrained(root / "lm")
    tokenizer = AutoTokenizer.from_pretrained(root / "lm")
    image_processor = CLOCProcessor.from_pretrained(root / "cloc").image_processor
    llava, _ = llava_cloc.build_llava(tower, lm, tokenizer, image_processor)
    llava.save_pretrained(tmp_path / "plain")
    run_isolated(
        clean_python,
        f"""
        from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration
        for load in (LlavaForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
            try:
                load({str(tmp_path / "plain")!r}, trust_remote_code=True)
            except ValueError as error:
                assert "Unrecognized model type for subconfig: cloc_vision_model" in str(error), error
            else:
                raise AssertionError("a LLaVA with a cloc_vision_model tower loaded without the package")
        """,
        tmp_path,
    )


@pytest.mark.parametrize("where", ["cloc", "lm", "."])
def test_output_dir_overlapping_an_input_model_is_refused_before_any_write(folders, where):
    root, _ = folders
    before = {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    with pytest.raises(ValueError, match="overwrite the input model"):
        llava_cloc.main(
            [
                "--cloc_model",
                str(root / "cloc"),
                "--language_model",
                str(root / "lm"),
                "--output_dir",
                str(root / where),
            ]
        )
    assert {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} == before
