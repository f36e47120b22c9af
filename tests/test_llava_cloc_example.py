"""`examples/llava_cloc.py` with tiny random CLOC and Llama folders: weights carried into LLaVA, the region-token
path inserts the projected Prompter state, generation is LLaVA's greedy answer, and the saved model reloads."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from examples import llava_cloc
from processing import CLOCProcessor
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import tiny_cloc_model


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
