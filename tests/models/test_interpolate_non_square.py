"""`interpolate_pos_encoding=True` with non-square images behaves the same on every path of both models: paths that
place patch tokens on a square grid (OC-CLIP's binding, CLOC's regions and grounding) refuse them by name before any
tower runs; image-text paths take them, as CLIP does, and equal CLIP."""

import pytest
import torch

from modeling_cloc import CLOCVisionModel
from modeling_occlip import OCCLIPVisionModel
from tests.factories import (
    BOS_ID,
    EOS_ID,
    encode_graphs,
    example_graphs,
    tiny_clip_model,
    tiny_cloc_model,
    tiny_occlip_model,
)

PIXELS = torch.randn(2, 3, 48, 32, generator=torch.Generator().manual_seed(0))  # a 6 x 4 patch grid
BOXES = torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.2, 0.3, 0.9, 0.8]]])
CAPTIONS = torch.tensor([[BOS_ID, 5, EOS_ID], [BOS_ID, 6, EOS_ID]])
REFUSAL = r"pixel_values of 48 x 32 pixels give a 6 x 4 patch grid; this path places the patch tokens on a square"


def _no_tower_run(tower, monkeypatch):
    """Make the patch embedding of `tower` (a full model's `vision_model`, or a standalone tower) fail if run."""

    def refuse(*args, **kwargs):
        raise AssertionError("the vision tower ran before the input was refused")

    monkeypatch.setattr(tower.embeddings, "forward", refuse)


def test_oc_clip_binding_paths_refuse_a_non_square_grid_before_the_towers(monkeypatch):
    model = tiny_occlip_model()
    graphs = encode_graphs(example_graphs()[:2])
    _no_tower_run(model.vision_model, monkeypatch)
    for call in (
        lambda: model.get_image_features(PIXELS, interpolate_pos_encoding=True),
        lambda: model(pixel_values=PIXELS, **graphs, interpolate_pos_encoding=True),
    ):
        with pytest.raises(ValueError, match=REFUSAL):
            call()


@torch.no_grad()
def test_oc_clip_vision_tower_takes_a_non_square_grid_as_clip():
    clip = tiny_clip_model(seed=1)
    tower = OCCLIPVisionModel(tiny_occlip_model().config.vision_config).eval()
    tower.load_state_dict(clip.vision_model.state_dict())
    expected = clip.vision_model(PIXELS, interpolate_pos_encoding=True)
    torch.testing.assert_close(tower(PIXELS, interpolate_pos_encoding=True).pooler_output, expected.pooler_output)


def test_cloc_region_paths_refuse_a_non_square_grid_before_the_towers(monkeypatch, tmp_path):
    model = tiny_cloc_model()
    model.save_pretrained(tmp_path)
    tower = CLOCVisionModel.from_pretrained(tmp_path)
    _no_tower_run(model.vision_model, monkeypatch)
    _no_tower_run(tower, monkeypatch)
    for call in (
        lambda: model.get_region_features(pixel_values=PIXELS, input_boxes=BOXES, interpolate_pos_encoding=True),
        lambda: model.ground(pixel_values=PIXELS, input_ids=CAPTIONS[:, None], interpolate_pos_encoding=True),
        lambda: model(input_ids=CAPTIONS, pixel_values=PIXELS, input_boxes=BOXES, interpolate_pos_encoding=True),
        lambda: tower(PIXELS, input_boxes=BOXES, interpolate_pos_encoding=True),
    ):
        with pytest.raises(ValueError, match=REFUSAL):
            call()


@torch.no_grad()
def test_cloc_image_text_paths_take_a_non_square_grid_as_clip(tmp_path):
    model = tiny_cloc_model()
    clip = tiny_clip_model()
    clip.load_state_dict(model.state_dict(), strict=False)
    expected = clip(input_ids=CAPTIONS, pixel_values=PIXELS, interpolate_pos_encoding=True)
    out = model(input_ids=CAPTIONS, pixel_values=PIXELS, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.logits_per_image, expected.logits_per_image)
    image = model.get_image_features(PIXELS, interpolate_pos_encoding=True)
    torch.testing.assert_close(
        image.pooler_output, clip.get_image_features(PIXELS, interpolate_pos_encoding=True).pooler_output
    )
    model.save_pretrained(tmp_path)
    tower = CLOCVisionModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(tower(PIXELS, interpolate_pos_encoding=True).last_hidden_state, image.last_hidden_state)
