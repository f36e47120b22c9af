"""Code outside the model folders (training, processing, examples) uses the models' public methods only:
`OCCLIPModel.bind_pairs` / `relation_negatives` for the diagnostics, `clamped_logit_scale` /
`clamped_region_logit_scale` for the losses and region tasks (the cap read from the config in one place)."""

import math
import random
import re
from pathlib import Path

import pytest
import torch

from processing.region_tasks import region_logit_scale
from tests.factories import (
    clip_vocab_text_config,
    encode_graphs,
    example_graphs,
    random_pixels,
    tiny_cloc_model,
    tiny_occlip_model,
)
from training.diagnostics import occlip_diagnostics
from training.synthetic import SceneConfig, generate_scene
from training.trainer import default_processor

REPO = Path(__file__).resolve().parents[2]
# `model._x`, `self.model._x`, `base_model(m)._x` ...: a private attribute of something named like a model.
PRIVATE_MODEL_ACCESS = re.compile(r"\bmodel(?:\([^)]*\))?\._(?!_)\w+")


@pytest.mark.parametrize("folder", ["training", "processing", "examples", "benchmarks"])
def test_no_private_model_method_is_called_outside_the_model_folders(folder):
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE_MODEL_ACCESS.search(line)
    ]
    assert not found, "\n".join(found)


@torch.no_grad()
def test_bind_pairs_is_the_matched_pairs_of_forward_and_of_the_binding_module():
    model = tiny_occlip_model()
    model.config._attn_implementation = "eager"
    graphs, pixels = encode_graphs(example_graphs()), random_pixels(4)
    out = model(pixel_values=pixels, **graphs, output_attentions=True)
    slots, attentions = model.bind_pairs(out.image_features, out.graph_features, output_attentions=True)
    assert len(attentions) == len(out.binding_attentions)
    for matched, grid in zip(attentions, out.binding_attentions):  # grid [I, H, T, Q, N]: captions on dim 2
        torch.testing.assert_close(matched, torch.stack([grid[k, :, k] for k in range(4)]), atol=1e-6, rtol=1e-6)
    # The slots are the binding module's own output on each image's keys/values and its own caption's queries.
    for k in range(4):
        one = model.bind_pairs(
            type(out.image_features)(
                binding_keys=out.image_features.binding_keys[k : k + 1],
                binding_values=out.image_features.binding_values[k : k + 1],
            ),
            model.get_graph_features(**{name: value[k : k + 1] for name, value in graphs.items()}),
        )
        assert one[1] is None
        torch.testing.assert_close(one[0][0], slots[k], atol=1e-6, rtol=1e-6)
    for convenience, matched in zip(model.binding_attention(out.image_features, out.graph_features), attentions):
        assert torch.equal(convenience, matched)
    with pytest.raises(ValueError, match="bind_pairs pairs image k with caption k: got 4 images and 2 captions"):
        model.bind_pairs(out.image_features, model.get_graph_features(**encode_graphs(example_graphs()[:2])))


def test_clamped_logit_scales_are_capped_at_the_config_value():
    model = tiny_cloc_model()
    cap = model.config.logit_scale_max
    with torch.no_grad():
        model.logit_scale.fill_(math.log(2 * cap))
        model.region_logit_scale.fill_(math.log(cap / 4))
    assert model.clamped_logit_scale().item() == pytest.approx(cap)
    assert model.clamped_region_logit_scale().item() == pytest.approx(cap / 4)
    assert region_logit_scale(model).item() == pytest.approx(cap / 4)  # the region tasks use the same
    occlip = tiny_occlip_model()
    with torch.no_grad():
        occlip.logit_scale.fill_(math.log(3.0))
    assert occlip.clamped_logit_scale().item() == pytest.approx(3.0)


def test_occlip_diagnostics_run_on_public_methods():
    """The diagnostics of the synthetic demo on a few in-memory scenes: finite values, the binding mass a share."""
    model = tiny_occlip_model(
        text={k: v for k, v in clip_vocab_text_config().items() if "token_id" in k or k == "vocab_size"}
    )
    processor = default_processor("occlip", 32)
    rng, config = random.Random(0), SceneConfig(image_size=32)
    rows = []
    for _ in range(8):
        image, sample = generate_scene(rng, config)
        rows.append({"image": image, **sample})
    found = occlip_diagnostics(model, processor, rows[:5], rows[5:])
    assert 0.0 <= found["binding_mass_own_box"] <= 1.0 and 0.0 <= found["binding_mass_other_boxes"] <= 1.0
    assert math.isfinite(found["relation_loss_chance"]) or math.isnan(found["relation_loss_chance"])
    assert set(found["probe_slots"]) == set(found["probe_patch_tokens"])
