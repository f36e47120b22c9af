"""Region calls (`processing.region_tasks`) against hand computations on a tiny CLOC model, and the pixel
geometry of the processor's resize + centre crop in both directions."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from processing import CLOCProcessor
from processing.region_tasks import classify_regions, ground_phrases, retrieve_regions
from tests.factories import clip_vocab_text_config, tiny_vision_config


def processor(short=32, crop=(32, 32)) -> CLOCProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": short}, crop_size={"height": crop[0], "width": crop[1]}
    )
    return CLOCProcessor(image_processor)


@pytest.fixture(scope="module")
def model():
    from modeling_cloc import CLOCConfig, CLOCModel

    torch.manual_seed(0)
    config = CLOCConfig(
        text_config=clip_vocab_text_config(),
        vision_config=tiny_vision_config(),
        prompter_config={"initializer_range": 0.2},
        projection_dim=24,
    )
    return CLOCModel(config).eval()


def noise_image(width, height, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "width, height, short, crop, window",
    [
        # (image size, shortest edge, crop (h, w), the crop window in original pixels: x0, y0, x1, y1)
        (64, 32, 32, (32, 32), (16, 0, 48, 32)),  # 2:1 landscape: resize 64x32, crop x from 16
        (32, 96, 32, (32, 32), (0, 32, 32, 64)),  # 1:3 portrait: resize 32x96, crop y from 32
        (128, 96, 32, (32, 32), (16, 0, 112, 96)),  # 4:3 at scale 1/3: resize 42x32 (int), crop x from 5
        (50, 50, 40, (32, 32), (5, 5, 45, 45)),  # square upscaled 0.8 -> 40, crop 4 px each side
        (80, 40, 40, (40, 24), (28, 0, 52, 40)),  # non-square crop: resize 80x40, crop 24 wide from x=28
    ],
)
def test_boxes_round_trip_through_the_processor_geometry(width, height, short, crop, window):
    proc = processor(short, crop)
    sx, sy, left, top, frame_w, frame_h = proc.frame_transform(height, width)
    # The crop window mapped back is the window expected by hand.
    window_back = proc.post_process_boxes(torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]), torch.tensor([[height, width]]))
    torch.testing.assert_close(window_back[0, 0], torch.tensor(window, dtype=torch.float32), atol=0.75 / sx, rtol=0)
    wx0, wy0, wx1, wy1 = window_back[0, 0].tolist()
    inside = [
        [wx0 + 1, wy0 + 1, wx0 + 9, wy0 + 7],
        [(wx0 + wx1) / 2 - 3, (wy0 + wy1) / 2 - 4, (wx0 + wx1) / 2 + 5, (wy0 + wy1) / 2 + 2],
        [wx0, wy0, wx1, wy1],
    ]
    partly = [0.0, 0.0, wx0 + 6, wy0 + 6]  # sticks out above / left of the crop: clipped to it
    normalized, valid = proc.normalize_boxes(inside + [partly], height, width, 0)
    assert valid == [True] * 4
    back = proc.post_process_boxes(torch.tensor([normalized]), torch.tensor([[height, width]]))[0]
    torch.testing.assert_close(back[:3], torch.tensor(inside), atol=1e-4, rtol=0)
    torch.testing.assert_close(back[3], torch.tensor([wx0, wy0, wx0 + 6, wy0 + 6]), atol=1e-4, rtol=0)


def test_processed_pixels_agree_with_the_box_map():
    """A white rectangle drawn in the original image lands where the box map says, in `pixel_values`."""
    proc = processor(32, (32, 32))
    array = np.zeros((64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high: resize 48x32, crop x from 8
    array[16:48, 40:64] = 255
    inputs = proc(images=[Image.fromarray(array)], input_boxes=[[[40, 16, 64, 48]]])
    torch.testing.assert_close(inputs["input_boxes"][0, 0], torch.tensor([12, 8, 24, 24]) / 32)
    bright = inputs["pixel_values"][0].mean(0)
    bright = bright > (bright.max() + bright.min()) / 2
    columns, rows = bright.any(0).nonzero().flatten(), bright.any(1).nonzero().flatten()
    assert (columns.min().item(), columns.max().item() + 1, rows.min().item(), rows.max().item() + 1) == (
        12,
        24,
        8,
        24,
    )


@torch.no_grad()
def test_classify_and_retrieve_equal_the_hand_computation(model):
    proc = processor()
    image = noise_image(64, 32)  # crop window x in [16, 48]
    boxes = [[16, 0, 32, 16], [20, 8, 48, 32], [0, 0, 10, 10]]  # the last one is cropped away
    classes = ["red circle", "blue square", "green cross"]
    result = classify_regions(model, proc, image, boxes, classes)
    # By hand: the processed frame is x - 16, y; boxes normalised by 32.
    pixels = proc.image_processor([image], return_tensors="pt")["pixel_values"]
    normalized = torch.tensor([[[0, 0, 16, 16], [4, 8, 32, 32]]]) / 32
    regions = model.get_region_features(pixel_values=pixels, input_boxes=normalized).region_embeds[0]
    tokens = proc.tokenizer(classes, padding=True, return_tensors="pt")
    text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    scale = model.region_logit_scale.exp()
    expected = scale * regions @ text.t()
    torch.testing.assert_close(result["logits"][:2], expected, atol=1e-5, rtol=1e-5)
    probabilities = expected.softmax(-1)
    assert result["label_ids"].tolist() == probabilities.argmax(-1).tolist() + [-1]
    assert result["labels"] == [classes[i] for i in probabilities.argmax(-1).tolist()] + [None]
    torch.testing.assert_close(result["scores"][:2], probabilities.max(-1).values)
    assert result["valid"].tolist() == [True, True, False]

    texts = ["a red circle", "a blue square"]
    tokens = proc.tokenizer(texts, padding=True, return_tensors="pt")
    text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    cosine = text @ regions.t()
    found = retrieve_regions(model, proc, image, boxes, texts)
    for t, hit in enumerate(found):
        torch.testing.assert_close(hit["scores"][:2], cosine[t], atol=1e-5, rtol=1e-5)
        assert hit["scores"][2] == float("-inf")  # the cropped-away box is never retrieved
        assert hit["index"] == int(cosine[t].argmax()) and hit["box"] == boxes[hit["index"]]
    single = retrieve_regions(model, proc, image, boxes, "a red circle")
    assert single["index"] == found[0]["index"]
    with pytest.raises(ValueError, match="class_names must be a non-empty list"):
        classify_regions(model, proc, image, boxes, [])
    with pytest.raises(ValueError, match="nothing to retrieve"):
        retrieve_regions(model, proc, image, [[0, 0, 10, 10]], "a red circle")


@torch.no_grad()
def test_ground_phrases_in_original_pixels(model):
    proc = processor()
    image = noise_image(64, 32, seed=1)  # resize 64x32 (scale 1), crop x from 16: pixel = 32 * n + (16, 0)
    phrases = ["a red circle", "the blue square on the left"]
    boxes = ground_phrases(model, proc, image, phrases)
    pixels = proc.image_processor([image], return_tensors="pt")["pixel_values"]
    tokens = proc.tokenizer(phrases, padding=True, return_tensors="pt")
    normalized = model.ground(
        pixel_values=pixels, input_ids=tokens["input_ids"][None], attention_mask=tokens["attention_mask"][None]
    ).predicted_boxes[0]
    expected = normalized * 32 + torch.tensor([16.0, 0.0, 16.0, 0.0])
    torch.testing.assert_close(boxes, expected, atol=1e-4, rtol=0)
    assert boxes.shape == (2, 4) and (boxes[:, 0] >= 16).all() and (boxes[:, 2] <= 48).all()
    with pytest.raises(ValueError, match="phrases must be a non-empty list"):
        ground_phrases(model, proc, image, "")


def test_readme_region_example_runs_on_a_tiny_saved_model(model, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "processing.region_tasks" in b]
    assert len(blocks) == 1, "README needs one python example of processing.region_tasks"
    model.save_pretrained(tmp_path / "cloc")
    processor().save_pretrained(tmp_path / "cloc")
    noise_image(400, 320).save(tmp_path / "street.jpg")
    code = (
        blocks[0].replace("path/to/cloc", str(tmp_path / "cloc")).replace("street.jpg", str(tmp_path / "street.jpg"))
    )
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102  (the README's own example)
    out, best = namespace["out"], namespace["best"]
    assert len(out["labels"]) == 2 and all(label in ("car", "person", "tree") for label in out["labels"])
    assert best["box"] == namespace["boxes"][best["index"]]
    assert best["scores"].argmax().item() == best["index"]


@torch.no_grad()
def test_classify_regions_with_the_roi_align_head():
    from modeling_cloc import CLOCConfig, CLOCModel

    torch.manual_seed(1)
    config = CLOCConfig(
        text_config=clip_vocab_text_config(),
        vision_config=tiny_vision_config(),
        region_head="roi_align",
        projection_dim=24,
    )
    roi = CLOCModel(config).eval()
    proc = processor()
    image = noise_image(32, 32, seed=2)  # no resize, no crop: normalised = pixels / 32
    boxes, classes = [[0, 0, 16, 16], [8, 8, 32, 24]], ["cat", "dog"]
    result = classify_regions(roi, proc, image, boxes, classes)
    pixels = proc.image_processor([image], return_tensors="pt")["pixel_values"]
    regions = roi.get_region_features(pixel_values=pixels, input_boxes=torch.tensor([boxes]) / 32).region_embeds[0]
    text = torch.nn.functional.normalize(
        roi.get_text_features(**proc.tokenizer(classes, padding=True, return_tensors="pt")).pooler_output, dim=-1
    )
    torch.testing.assert_close(
        result["logits"], roi.region_logit_scale.exp() * regions @ text.t(), atol=1e-5, rtol=1e-5
    )
