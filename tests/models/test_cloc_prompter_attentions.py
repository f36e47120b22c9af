"""The CLOC Prompter's attentions come out through `output_attentions`, as OC-CLIP's binding attentions do:
`get_region_features` / `ground` (`prompter_attentions`), `CLOCModel.forward` (`region_attentions`,
`grounding_attentions`) and `CLOCVisionModel` (`region_attentions`), one `[B, R, H, T_p, T_p + 1 + N]` tensor per
layer; their image columns, averaged, are the `image_attention` helper's."""

import pytest
import torch

from modeling_cloc import CLOCVisionModel
from tests.factories import BOS_ID, EOS_ID, random_pixels, tiny_cloc_model

BOXES = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9], [0.0, 0.0, 0.2, 0.2]], [[0.0, 0.5, 0.5, 1.0]] * 3])
BOX_MASK = torch.tensor([[True, True, True], [True, False, False]])
CAPTIONS = torch.tensor([[[BOS_ID, 5, EOS_ID], [BOS_ID, 6, EOS_ID], [BOS_ID, 7, EOS_ID]]] * 2)
VARIANTS = {
    "one head": {},
    "two heads, box bias": {"num_attention_heads": 2, "box_attention_bias": 2.0},
    "two layers": {"num_hidden_layers": 2, "num_attention_heads": 2},
}


def model_of(variant: str):
    model = tiny_cloc_model(seed=3, **VARIANTS[variant])
    return model, model.get_image_tokens(random_pixels(2, seed=4))


def full_image_boxes() -> torch.Tensor:
    """The boxes as the Prompter sees them: masked ones replaced by the full image."""
    return torch.where(BOX_MASK[..., None], BOXES, torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_region_attentions_are_softmax_rows_and_match_the_image_attention_helper(variant):
    model, tokens = model_of(variant)
    config = model.config.prompter_config
    out = model.get_region_features(image_tokens=tokens, input_boxes=BOXES, box_mask=BOX_MASK, output_attentions=True)
    attentions = out.prompter_attentions
    num_tokens = tokens.shape[1]
    assert len(attentions) == config.num_hidden_layers
    for attention in attentions:
        assert attention.shape == (2, 3, config.num_attention_heads, 2, 2 + num_tokens)
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))
    # Same embeddings as without attentions (the explicit softmax is SDPA's computation).
    plain = model.get_region_features(image_tokens=tokens, input_boxes=BOXES, box_mask=BOX_MASK)
    assert plain.prompter_attentions is None
    torch.testing.assert_close(out.region_embeds, plain.region_embeds, atol=1e-6, rtol=1e-5)
    if config.num_hidden_layers == 1:
        boxes = full_image_boxes()
        helper = model.prompter.image_attention(model.prompter.box_prompts(boxes), tokens, boxes)
        torch.testing.assert_close(attentions[0][..., 2:].mean(dim=(2, 3)), helper)


@pytest.mark.parametrize("variant", ["one head", "two heads, box bias"])
@torch.no_grad()
def test_the_one_layer_fast_path_gives_the_full_sequence_paths_attentions(variant):
    """A one-layer Prompter's first (only) layer sees the same prompt rows and image tokens on both paths: the
    shared-keys fast path must report what the full per-region sequence computes."""
    model, tokens = model_of(variant)
    boxes = full_image_boxes()
    prompts = model.prompter.box_prompts(boxes)
    _, _, fast = model.prompter.forward_with_attentions(prompts, tokens, boxes)
    model.prompter.pooling = "all"  # pooling only changes what is pooled; it forces the full-sequence path
    _, _, full = model.prompter.forward_with_attentions(prompts, tokens, boxes)
    torch.testing.assert_close(fast[0], full[0], atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_forward_ground_and_the_tower_report_the_same_attentions(tmp_path):
    model, _ = model_of("two heads, box bias")
    pixels = random_pixels(2, seed=4)
    ids = torch.tensor([[BOS_ID, 5, EOS_ID], [BOS_ID, 6, EOS_ID]])
    inputs = dict(input_ids=ids, pixel_values=pixels, input_boxes=BOXES, box_mask=BOX_MASK, region_input_ids=CAPTIONS)
    out = model(**inputs, output_attentions=True)
    regions = model.get_region_features(
        pixel_values=pixels, input_boxes=BOXES, box_mask=BOX_MASK, output_attentions=True
    )
    grounded = model.ground(pixel_values=pixels, input_ids=CAPTIONS, output_attentions=True)
    for ours, reference in zip(out.region_attentions, regions.prompter_attentions):
        torch.testing.assert_close(ours, reference)
    valid = BOX_MASK  # forward embeds only the valid region captions
    for ours, reference in zip(out.grounding_attentions, grounded.prompter_attentions):
        assert ours.shape == (2, 3, 2, 1, 1 + 1 + 16)
        torch.testing.assert_close(ours[valid], reference[valid], atol=1e-6, rtol=1e-5)
    tokens = model.get_image_tokens(pixels)
    prompts = model.prompter.text_prompts(grounded.region_text_embeds)
    helper = model.prompter.image_attention(prompts, tokens)
    torch.testing.assert_close(grounded.prompter_attentions[0][..., 1:].mean(dim=(2, 3)), helper)
    assert model(**inputs).region_attentions is None and model(**inputs).grounding_attentions is None
    # config.output_attentions is the default, as for the towers (which then need eager attention).
    model.set_attn_implementation("eager")
    model.config.output_attentions = True
    assert model.ground(pixel_values=pixels, input_ids=CAPTIONS).prompter_attentions is not None
    model.config.output_attentions = False
    model.save_pretrained(tmp_path)
    tower = CLOCVisionModel.from_pretrained(tmp_path).eval()
    from_tower = tower(pixels, input_boxes=BOXES, box_mask=BOX_MASK, output_attentions=True)
    torch.testing.assert_close(from_tower.region_attentions[0], regions.prompter_attentions[0], atol=1e-6, rtol=1e-5)
    assert tower(pixels, input_boxes=BOXES, box_mask=BOX_MASK).region_attentions is None


@torch.no_grad()
def test_the_roi_head_has_no_prompter_attentions():
    model = tiny_cloc_model(seed=3)
    model.config.region_head = "roi_align"
    from modeling_cloc import CLOCModel

    roi = CLOCModel(model.config).eval()
    tokens = roi.get_image_tokens(random_pixels(2, seed=4))
    out = roi.get_region_features(image_tokens=tokens, input_boxes=BOXES, box_mask=BOX_MASK, output_attentions=True)
    assert out.prompter_attentions is None and out.region_embeds.shape == (2, 3, 24)
