"""`training.losses` on one process equals the models' own `return_loss=True` loss, term by term; scoring blocks of
rows (open_clip's local loss) averages to the whole batch's loss."""

import pytest
import torch

from modeling_cloc.modeling_cloc import cloc_loss
from tests.distributed_cases import captions, full_batch
from tests.factories import random_pixels, tiny_clip_model, tiny_cloc_model, tiny_occlip_model
from training.losses import ClipLoss, CLOCLoss, OCCLIPLoss, clip_contrastive_loss
from training.objectives import logit_scale


@torch.no_grad()
def test_clip_loss_is_clip_model_loss():
    model = tiny_clip_model(seed=3)
    model.logit_scale.fill_(3.0)  # a temperature other than the initial one, under the cap
    out = model(pixel_values=random_pixels(4, seed=1), input_ids=captions(4, seed=2), return_loss=True)
    loss = ClipLoss()(out.image_embeds, out.text_embeds, logit_scale(model))
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rel_loss_weight", [0.0, 0.7])
@torch.no_grad()
def test_occlip_loss_is_occlip_model_loss(rel_loss_weight):
    model = tiny_occlip_model(seed=4, rel_loss_weight=rel_loss_weight)
    out = model(**full_batch("occlip"), return_loss=True)
    loss, loss_itc, loss_rel = OCCLIPLoss()(model, out.image_features, out.graph_features)
    torch.testing.assert_close(loss, out.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss_itc, out.loss_itc, atol=1e-6, rtol=1e-6)
    expected_itc = torch.nn.functional.cross_entropy(out.logits_per_image, torch.arange(4))
    expected_itc = 0.5 * (expected_itc + torch.nn.functional.cross_entropy(out.logits_per_text, torch.arange(4)))
    torch.testing.assert_close(loss_itc, expected_itc, atol=1e-6, rtol=1e-6)
    if rel_loss_weight:
        torch.testing.assert_close(loss_rel, out.loss_rel, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(loss, loss_itc + rel_loss_weight * loss_rel, atol=1e-6, rtol=1e-6)
    else:
        assert loss_rel is None and out.loss_rel is None


CLOC_KEYS = CLOCLoss.feature_names


def cloc_features(out, batch) -> dict:
    found = {k: getattr(out, k, None) for k in CLOC_KEYS}
    found["input_boxes"] = batch["input_boxes"]
    return found


@pytest.mark.parametrize("settings", [{}, {"region_text_filter": "cosine", "grounding_attention_loss_weight": 0.5}])
@torch.no_grad()
def test_cloc_loss_is_cloc_model_loss(settings):
    model = tiny_cloc_model(seed=5)
    for name, value in settings.items():
        setattr(model.config, name, value)
    batch = full_batch("cloc")
    out = model(**batch, return_loss=True)
    terms = CLOCLoss()(model, **cloc_features(out, batch))
    expected = (out.loss, out.loss_itc, out.loss_region, out.loss_grounding, out.loss_grounding_attention)
    assert (terms[4] is None) == ("grounding_attention_loss_weight" not in settings)
    for got, want in zip(terms, expected):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # Three of the four images have regions: lambda = region_loss_weight x 3/4.
    weight = model.config.region_loss_weight * 3 / 4
    attention = settings.get("grounding_attention_loss_weight", 0) * (terms[4] if terms[4] is not None else 0)
    torch.testing.assert_close(terms[0], terms[1] + weight * (terms[2] + terms[3] + attention))


@torch.no_grad()
def test_scoring_blocks_of_rows_averages_to_the_batch_loss():
    """open_clip's local loss: each process's rows against every column, scaled so the mean over processes is
    the loss of the whole batch (padding rows excluded)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1)
    valid = torch.tensor([True, True, True, True, True, False])  # the second block's last row is padding
    scale = torch.tensor(7.0)
    full = clip_contrastive_loss(images, texts, scale, valid, negatives)
    blocks = [clip_contrastive_loss(images, texts, scale, valid, negatives, rows=slice(i, i + 3)) for i in (0, 3)]
    torch.testing.assert_close(torch.stack(blocks).mean(), full)
    # The full loss by hand over the five real rows.
    logits = scale * images[:5] @ torch.cat([texts[:5], negatives[:5]]).t()
    targets = torch.arange(5)
    by_hand = 0.5 * (
        torch.nn.functional.cross_entropy(logits, targets)
        + torch.nn.functional.cross_entropy(scale * texts[:5] @ images[:5].t(), targets)
    )
    torch.testing.assert_close(full, by_hand)


@torch.no_grad()
def test_cloc_loss_blocks_of_rows_average_to_the_batch_loss():
    model = tiny_cloc_model(seed=6)
    model.config.grounding_attention_loss_weight = 0.5
    batch = full_batch("cloc")
    out = model(**batch, return_loss=True)
    mask = out.box_mask
    regions = {
        "region_embeds": out.region_embeds[mask],
        "region_text_embeds": out.region_text_embeds[mask],
        "region_caption_keys": out.region_caption_keys[mask],
        "box_mask": mask,
        "input_boxes": batch["input_boxes"],
        "predicted_boxes": out.predicted_boxes,
        "grounding_mask": out.grounding_mask,
        "grounding_attention_mass": out.grounding_attention_mass,
    }
    scales = (model.logit_scale.exp(), model.region_logit_scale.exp())
    full = cloc_loss(model.config, *scales, out.image_embeds, out.text_embeds, regions=regions)
    count = int(mask.sum())
    halves = [
        cloc_loss(
            model.config,
            *scales,
            out.image_embeds,
            out.text_embeds,
            regions=regions,
            rows=slice(i, i + 2),
            region_rows=slice(r, r + count // 2),
        )
        for i, r in ((0, 0), (2, count // 2))
    ]
    for position in range(4):
        torch.testing.assert_close((halves[0][position] + halves[1][position]) / 2, full[position])
    torch.testing.assert_close(full[0], out.loss)


@torch.no_grad()
def test_logit_scale_cap_comes_from_the_config():
    """One cap for the loss's temperature and the trainer's clamp: the config's `logit_scale_max`, else 100."""
    from training.objectives import clamp_logit_scale_parameters

    occlip = tiny_occlip_model(seed=1)
    occlip.config.logit_scale_max = 20.0
    occlip.logit_scale.fill_(10.0)
    assert logit_scale(occlip).item() == pytest.approx(20.0)
    clamp_logit_scale_parameters(occlip, ["logit_scale"])
    assert occlip.logit_scale.item() == pytest.approx(torch.log(torch.tensor(20.0)).item())
    clip = tiny_clip_model(seed=1)  # transformers' CLIPConfig has no cap: open_clip's 100
    clip.logit_scale.fill_(10.0)
    assert logit_scale(clip).item() == pytest.approx(100.0)
    clamp_logit_scale_parameters(clip, ["logit_scale"])
    assert clip.logit_scale.item() == pytest.approx(torch.log(torch.tensor(100.0)).item())


@pytest.mark.slow
def test_clip_objective_and_loss_load_no_oc_clip_or_cloc_model_file():
    """Training plain CLIP needs neither model file (CLIP's loss once lived in CLOC's)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from training.objectives import CLIPObjective\n"
        "from training.losses import ClipLoss\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('modeling_cloc', 'modeling_occlip')))\n"
        "assert not loaded, loaded\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
