"""CLOC model core: region embeddings (permutation, caching, padding, exact prompt-only path), losses, grounding."""

from unittest import mock

import pytest
import torch

from modeling_cloc import CLOCModel, CLOCPrompter
from modeling_cloc.modeling_cloc import box_patch_overlap
from tests.factories import random_pixels, tiny_cloc_model

BOXES = torch.tensor(
    [
        [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]],
        [[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.25, 0.25], [0.4, 0.1, 0.6, 0.3]],
    ]
)


@pytest.fixture(scope="module")
def model():
    return tiny_cloc_model()


@torch.no_grad()
def test_permuting_boxes_permutes_region_embeddings(model):
    pixels = random_pixels(2)
    order = torch.tensor([2, 0, 1])
    base = model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds
    permuted = model.get_region_features(pixel_values=pixels, input_boxes=BOXES[:, order]).region_embeds
    torch.testing.assert_close(permuted, base[:, order], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(base[:, 0], base[:, 1], atol=1e-3)  # different boxes, different embeddings


@torch.no_grad()
def test_cached_image_tokens_match_recomputation(model):
    pixels = random_pixels(2, seed=3)
    tokens = model.get_image_features(pixels).last_hidden_state
    from_tokens = model.get_region_features(image_tokens=tokens, input_boxes=BOXES).region_embeds
    torch.testing.assert_close(
        from_tokens, model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds
    )
    more = model.get_region_features(
        image_tokens=tokens, input_boxes=torch.cat([BOXES, BOXES.flip(1)], dim=1)
    ).region_embeds
    torch.testing.assert_close(more[:, :3], from_tokens, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_padding_boxes_never_changes_valid_outputs(model):
    pixels = random_pixels(2, seed=4)
    base = model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds
    padded = torch.cat([BOXES, torch.tensor([[[0.3, 0.3, 0.4, 0.4]], [[float("nan")] * 4]])], dim=1)
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    out = model.get_region_features(pixel_values=pixels, input_boxes=padded, box_mask=mask).region_embeds
    torch.testing.assert_close(out[:, :3], base, atol=1e-6, rtol=1e-6)
    assert torch.all(out[:, 3] == 0)


@torch.no_grad()
def test_prompt_only_path_equals_full_sequence_layer(model):
    """The cached-keys path computes exactly the prompt rows of one layer over [prompt ; image tokens]."""
    tokens = model.get_image_features(random_pixels(2, seed=5)).last_hidden_state
    prompts = model.prompter.box_prompts(BOXES)
    hidden, _ = model.prompter(prompts, tokens)
    layer = model.prompter.layers[0]
    full = torch.cat([prompts, tokens[:, None].expand(-1, 3, -1, -1)], dim=2).flatten(0, 1)
    # Image rows get the patch positions after the layer norm; prompt rows get none.
    position = torch.nn.functional.pad(
        model.prompter.image_position(tokens.shape[1], tokens.dtype, None), (0, 0, 2, 0)
    )
    assert position[2:].abs().sum() > 0
    expected = layer(full, position=position)[0][:, :2].mean(1).view(2, 3, -1)
    torch.testing.assert_close(hidden, expected, atol=1e-5, rtol=1e-5)
    all_pooling = tiny_cloc_model(pooling="all")
    all_pooling.load_state_dict(model.state_dict())
    h_all, _ = all_pooling.prompter(prompts, tokens)
    torch.testing.assert_close(h_all, layer(full, position=position)[0].mean(1).view(2, 3, -1), atol=1e-5, rtol=1e-5)


def test_text_similarity_mask_removes_exactly_duplicate_captions(model):
    u = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    u[3] = u[0]  # same caption twice
    u[4] = torch.nn.functional.normalize(u[1] + 0.01 * torch.randn(24), dim=0)  # near-duplicate (cos > 0.9)
    keep = model.region_negative_mask(u)
    expected = torch.ones(5, 5, dtype=torch.bool)
    for a, b in ((0, 3), (1, 4)):
        expected[a, b] = expected[b, a] = False
    assert keep.tolist() == expected.tolist()


def batch():
    ids = torch.tensor([[98, 5, 99, 0], [98, 6, 99, 0], [98, 4, 99, 0]])
    region_ids = torch.tensor(
        [[[98, 7, 99], [98, 8, 99], [98, 9, 99]], [[98, 10, 99], [98, 11, 99], [98, 12, 99]], [[98, 1, 99]] * 3]
    )
    boxes = torch.cat([BOXES, BOXES[:1]])
    mask = torch.tensor([[True, True, True], [True, True, True], [False, False, False]])  # image 2 has no regions
    return dict(
        input_ids=ids,
        pixel_values=random_pixels(3, seed=6),
        input_boxes=boxes,
        box_mask=mask,
        region_input_ids=region_ids,
    )


def test_loss_is_clip_plus_scaled_region_terms(model):
    with torch.no_grad():
        out = model(**batch(), return_loss=True)
    expected = out.loss_itc + (2 / 3) * (out.loss_region + out.loss_grounding)
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("orphan", ["region_input_ids", "box_mask"])
def test_region_inputs_without_boxes_are_refused_not_dropped(model, orphan):
    inputs = batch()
    del inputs["input_boxes"]
    inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "pixel_values", orphan)}
    with pytest.raises(ValueError, match=f"got {orphan} without input_boxes"):
        model(**inputs, return_loss=True)


def test_head_initialisation_follows_the_config():
    """The heads own no parameter directly; `_init_weights` still gives them their configured init."""
    model = tiny_cloc_model(initializer_range=0.05)
    assert 0.03 < model.box_head.fc1.weight.std() < 0.07
    assert torch.all(model.box_head.fc2.weight == 0)
    assert 0.03 < model.prompter.layers[0].fc1.weight.std() < 0.07


def test_losses_fall_and_grounding_overfits():
    model = tiny_cloc_model(seed=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = batch()
    history = []
    for _ in range(400):
        out = model(**inputs, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        history.append((out.loss_itc.item(), out.loss_region.item(), out.loss_grounding.item()))
    first, last = history[0], history[-1]
    assert all(b < 0.05 * a for a, b in zip(first, last)), history[::25]
    model.eval()
    with torch.no_grad():
        predicted = model.ground(
            pixel_values=inputs["pixel_values"][:2], input_ids=inputs["region_input_ids"][:2]
        ).predicted_boxes
    target = inputs["input_boxes"][:2]
    lo, hi = torch.maximum(predicted[..., :2], target[..., :2]), torch.minimum(predicted[..., 2:], target[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area_p = (predicted[..., 2:] - predicted[..., :2]).clamp(min=0).prod(-1)
    area_t = (target[..., 2:] - target[..., :2]).prod(-1)
    iou = inter / (area_p + area_t - inter)
    assert iou.min() > 0.85, iou  # every box overlaps its target closely (chance is about 0.1)


@pytest.mark.parametrize(
    "boxes, message",
    [
        (torch.tensor([[[0.5, 0.1, 0.4, 0.6]]]), r"image 0, box 0: .* 0 <= x0 < x1 <= 1"),
        (torch.tensor([[[0.1, 0.1, 0.4, float("inf")]]]), "image 0, box 0"),
        (torch.tensor([[0.1, 0.1, 0.4, 0.6]]), r"expected \[1, regions, 4\]"),
    ],
)
def test_bad_boxes_name_image_and_box(model, boxes, message):
    with pytest.raises(ValueError, match=message):
        model.get_region_features(pixel_values=random_pixels(1), input_boxes=boxes)


def test_save_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    reloaded = CLOCModel.from_pretrained(tmp_path).eval()
    pixels = random_pixels(2, seed=8)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds,
            model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds,
            atol=0,
            rtol=0,
        )


def test_roi_align_mean_is_exact_on_a_linear_field():
    from modeling_cloc.modeling_cloc import roi_align_mean

    side = 4
    centres = (torch.arange(side) + 0.5) / side  # patch centres in image coordinates
    grid_x, grid_y = centres.expand(side, side), centres[:, None].expand(side, side)
    tokens = torch.stack([grid_x.flatten(), grid_y.flatten(), torch.ones(side * side)], dim=-1)[None]  # [1, 16, 3]
    boxes = torch.tensor([[[0.2, 0.3, 0.7, 0.8], [0.4, 0.2, 0.6, 0.5]]])
    pooled = roi_align_mean(tokens, boxes, samples=7)
    # Bilinear sampling reproduces a linear field inside the patch-centre hull: the mean is the box centre.
    expected = torch.tensor([[[0.45, 0.55, 1.0], [0.5, 0.35, 1.0]]])
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_roi_align_head_is_a_configurable_alternative():
    roi = tiny_cloc_model(seed=2, initializer_range=0.2)
    assert roi.roi_head is None
    from modeling_cloc import CLOCConfig, CLOCModel

    config = CLOCConfig(**{**roi.config.to_dict(), "region_head": "roi_align"})
    model = CLOCModel(config).eval()
    pixels = random_pixels(2)
    tokens = model.get_image_features(pixels).last_hidden_state
    out = model.get_region_features(image_tokens=tokens, input_boxes=BOXES).region_embeds
    from modeling_cloc.modeling_cloc import roi_align_mean

    pooled = roi_align_mean(tokens[:, 1:], BOXES, 7)
    expected = torch.nn.functional.normalize(model.roi_head.projection(model.roi_head.norm(pooled)), dim=-1)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="region_head must be"):
        CLOCConfig(region_head="mask")


@pytest.mark.parametrize("layers", [1, 2])
def test_gradient_checkpointing_gives_identical_gradients(layers):
    """Towers and Prompter layers (prompt-only path with 1 layer, full sequence with 2) recompute exactly."""

    def grads(enable: bool):
        model = tiny_cloc_model(seed=6, num_hidden_layers=layers).train()
        if enable:
            model.activation_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.prompter.layers)
        model(**batch(), return_loss=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 60
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert plain[f"prompter.layers.{layers - 1}.q_proj.weight"].abs().sum() > 0


@torch.no_grad()
def test_image_attention_is_the_attention_the_prompter_uses():
    """A literal one-head layer (logits + box bias, softmax over [own prompt tokens ; image tokens], values,
    residual, MLP) rebuilds the Prompter's output, and its image columns are what `image_attention` reports."""
    model = tiny_cloc_model(seed=2, box_attention_bias=3.0, num_attention_heads=1)
    prompter, layer = model.prompter, model.prompter.layers[0]
    tokens = model.get_image_features(random_pixels(2, seed=6)).last_hidden_state
    boxes = BOXES[:, :1]
    prompts = prompter.box_prompts(boxes)  # [B, 1, 2, D]
    hidden, _ = prompter(prompts, tokens, boxes)
    position = prompter.image_position(tokens.shape[1], tokens.dtype, None)
    queries = prompts[:, 0]
    normed, image = layer.norm1(queries), layer.norm1(tokens) + position
    keys = torch.cat([layer.k_proj(normed), layer.k_proj(image)], 1)
    values = torch.cat([layer.v_proj(normed), layer.v_proj(image)], 1)
    overlap = prompter.box_attention_scale * box_patch_overlap(boxes[:, 0], tokens.shape[1] - 1)  # [B, N]
    bias = torch.cat([torch.zeros(2, 3), overlap], 1)[:, None]  # no bias on own prompts and CLS
    attention = (layer.q_proj(normed) @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5 + bias).softmax(-1)
    rows = queries + layer.out_proj(attention @ values)
    rows = rows + layer.fc2(layer.activation_fn(layer.fc1(layer.norm2(rows))))
    torch.testing.assert_close(hidden[:, 0], rows.mean(1), atol=1e-5, rtol=1e-5)
    reported = prompter.image_attention(prompts, tokens, boxes)[:, 0]
    torch.testing.assert_close(reported, attention[..., 2:].mean(1), atol=1e-5, rtol=1e-5)


def test_box_patch_overlap_known_values():
    # 2 x 2 grid; the box covers the left half of the top-left cell and all of the bottom-left cell's top half.
    overlap = box_patch_overlap(torch.tensor([[0.0, 0.0, 0.25, 0.75]]), 4)
    torch.testing.assert_close(overlap, torch.tensor([[0.5, 0.0, 0.25, 0.0]]))


def test_exact_filter_drops_only_identical_captions_and_l1_grounding():
    """Region loss by hand: with the exact filter, a caption repeated in the batch leaves the softmax (and a
    different caption stays, however close its embedding); the l1 grounding loss is the mean absolute error."""
    from modeling_cloc.modeling_cloc import caption_keys

    model = tiny_cloc_model(seed=3)
    model.config.grounding_loss = "l1"
    inputs = batch()
    inputs["region_input_ids"][1, 2] = inputs["region_input_ids"][0, 0]  # "7" twice: image 0 box 0, image 1 box 2
    with torch.no_grad():
        out = model(**inputs, return_loss=True)
    keys = out.region_caption_keys
    assert keys[0, 0] == keys[1, 2] and len(set(keys[:2].flatten().tolist())) == 5
    # Padding never changes a key (processes pad to their own longest caption).
    assert torch.equal(caption_keys(torch.tensor([[98, 7, 99, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])), keys[0, :1])
    valid = inputs["box_mask"]
    regions, texts = out.region_embeds[valid], out.region_text_embeds[valid]
    logits = model.region_logit_scale.exp() * regions @ texts.t()
    duplicate = torch.zeros(6, 6, dtype=torch.bool)
    duplicate[0, 5] = duplicate[5, 0] = True
    expected = 0.0
    for matrix in (logits, logits.t()):
        expected += 0.5 * torch.nn.functional.cross_entropy(matrix.masked_fill(duplicate, -torch.inf), torch.arange(6))
    torch.testing.assert_close(out.loss_region, expected)
    target = (out.predicted_boxes - inputs["input_boxes"]).abs()[out.grounding_mask]
    torch.testing.assert_close(out.loss_grounding, target.mean())


@torch.no_grad()
def test_prompter_reads_the_configured_layer():
    model = tiny_cloc_model(seed=4, vision_feature_layer=1)
    pixels = random_pixels(2, seed=7)
    hidden = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(model.get_image_tokens(pixels), hidden)
    expected = model.get_region_features(image_tokens=hidden, input_boxes=BOXES).region_embeds
    torch.testing.assert_close(
        model.get_region_features(pixel_values=pixels, input_boxes=BOXES).region_embeds, expected
    )
    out = model(input_ids=batch()["input_ids"][:2], pixel_values=pixels, input_boxes=BOXES)
    torch.testing.assert_close(out.region_embeds, expected)


def test_prompter_init_default_scales_with_width():
    from modeling_cloc import CLOCConfig, CLOCModel
    from tests.factories import tiny_text_config, tiny_vision_config

    config = CLOCConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    model = CLOCModel(config)
    width = config.vision_config.hidden_size
    std = float(model.prompter.layers[0].q_proj.weight.detach().std())
    assert abs(std - 1.7 / width**0.5) < 0.25 * 1.7 / width**0.5


def test_grounding_attention_loss_is_minus_log_of_the_text_prompt_mass_inside_the_box():
    """By hand from `image_attention`: each caption's patch attention (CLS left out, renormalised) weighted by the
    box's cover of each patch; the loss is the mean `-log` over grounding targets, added inside lambda, and its
    gradient reaches the Prompter's query projection."""
    model = tiny_cloc_model(seed=5)
    model.config.grounding_attention_loss_weight = 0.5
    inputs = batch()
    out = model(**inputs, return_loss=True)
    prompter = model.prompter
    with torch.no_grad():
        tokens = model.get_image_tokens(inputs["pixel_values"])
        attention = prompter.image_attention(prompter.text_prompts(out.region_text_embeds), tokens)[..., 1:]
        cover = box_patch_overlap(inputs["input_boxes"], attention.shape[-1])
        mass = (attention / attention.sum(-1, keepdim=True) * cover).sum(-1)
    valid = inputs["box_mask"]
    torch.testing.assert_close(out.grounding_attention_mass[valid], mass[valid])
    assert torch.all(out.grounding_attention_mass[~valid] == 0)
    expected_term = -torch.log(mass[out.grounding_mask] + 1e-6).mean()
    torch.testing.assert_close(out.loss_grounding_attention, expected_term)
    torch.testing.assert_close(
        out.loss, out.loss_itc + (2 / 3) * (out.loss_region + out.loss_grounding + 0.5 * expected_term)
    )
    out.loss_grounding_attention.backward()
    assert prompter.layers[0].q_proj.weight.grad.abs().sum() > 0


def test_grounding_attention_loss_needs_a_one_layer_prompter():
    from modeling_cloc import CLOCConfig

    with pytest.raises(ValueError, match="one-layer Prompter"):
        CLOCConfig(prompter_config={"num_hidden_layers": 2}, grounding_attention_loss_weight=1.0)
    with pytest.raises(ValueError, match="grounding_attention_loss_weight must be finite"):
        CLOCConfig(grounding_attention_loss_weight=float("nan"))


def test_grounding_attention_mass_comes_from_the_grounding_pass_unchanged():
    """forward reads the text prompts' attention from the grounding pass itself (explicit softmax, weights kept)
    instead of computing it a second time: boxes, attention mass, loss and gradients equal the two-pass route (SDPA
    grounding pass, then `attention_over_image`)."""
    model = tiny_cloc_model(seed=5)
    model.config.grounding_attention_loss_weight = 0.5
    inputs = batch()
    with mock.patch.object(CLOCPrompter, "attention_over_image", side_effect=AssertionError("a second pass")):
        one_pass = model(**inputs, return_loss=True)
    one_pass.loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ground = model._ground
    model._ground = lambda tokens, embeds, output_attentions=False: ground(tokens, embeds, False)  # no weights kept
    two_pass = model(**inputs, return_loss=True)
    two_pass.loss.backward()
    for name in ("predicted_boxes", "grounding_attention_mass", "loss_grounding_attention", "loss"):
        torch.testing.assert_close(getattr(one_pass, name), getattr(two_pass, name), atol=1e-6, rtol=1e-5, msg=name)
    assert grads.keys() == {k for k, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, atol=1e-6, rtol=1e-4, msg=name)
    assert grads["prompter.layers.0.q_proj.weight"].abs().sum() > 0
