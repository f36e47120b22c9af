"""CLOCProcessor: SAM-style box geometry through resize + centre crop, inverse map, masking, errors, round trip."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPImageProcessorPil

from modeling_cloc import CLOCConfig, CLOCModel
from processing import CLOCProcessor
from tests.factories import clip_vocab_text_config, tiny_vision_config


def processor() -> CLOCProcessor:
    return CLOCProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


def scene() -> Image.Image:
    """60 x 40 black image with a white rectangle at x 10..30, y 5..25."""
    array = np.zeros((40, 60, 3), dtype=np.uint8)
    array[5:25, 10:30] = 255
    return Image.fromarray(array)


def test_boxes_follow_resize_and_centre_crop():
    # shortest edge 40 -> 32 (scale 0.8): 48 x 32, crop 32 at left (48 - 32) // 2 = 8, top 0.
    out = processor()(images=[scene()], input_boxes=[[[10, 5, 30, 25]]])
    torch.testing.assert_close(out["input_boxes"], torch.tensor([[[0.0, 0.125, 0.5, 0.625]]]))
    assert set(out) == {"pixel_values", "input_boxes", "box_mask"}  # model inputs only: no original_sizes
    pixels = out["pixel_values"][0].mean(0)  # the drawn rectangle is where the normalised box says
    inside, outside = pixels[5:19, 1:15].mean(), pixels[22:, 18:].mean()
    assert inside > 1.0 and outside < -1.0


def test_post_process_inverts_the_map_and_cropped_boxes_are_masked(caplog):
    proc = processor()
    boxes = [[[10, 5, 30, 25], [-10, -5, 20, 20], [0, 0, 5, 40], [12.5, 7.5, 40, 30]]]
    with caplog.at_level(logging.WARNING):
        out = proc(images=[scene()], input_boxes=boxes)
    assert out["box_mask"].tolist() == [[True, True, False, True]]  # box 2 lies in the cropped-off strip
    assert "image 0, box 2" in caplog.text
    back = proc.post_process_boxes(out["input_boxes"], target_sizes=[(40, 60)])
    torch.testing.assert_close(back[0, 0], torch.tensor([10.0, 5.0, 30.0, 25.0]))
    torch.testing.assert_close(back[0, 1], torch.tensor([10.0, 0.0, 20.0, 20.0]))  # clipped to image, then crop
    torch.testing.assert_close(back[0, 3], torch.tensor([12.5, 7.5, 40.0, 30.0]))


@pytest.mark.parametrize(
    "boxes, captions, message",
    [
        ([[[10, 5, 5, 25]]], None, r"image 0, box 0: .*x1 > x0"),
        ([[[10, 5, 30, float("nan")]]], None, "image 0, box 0: .*NaN"),
        ([[[10, 5, 30]]], None, r"image 0, box 0: box \[10, 5, 30\] is not 4 numbers \[x0, y0, x1, y1\]"),
        ([[10, 5, 30, 25]], None, r"image 0: input_boxes\[0\] must be a list of"),
        ([[[10, 5, 30, 25]], [[1, 1, 2, 2]]], None, "one list of boxes per image: 2 for 1 images"),
        ([[[10, 5, 30, 25], [1, 1, 9, 9]]], [["a cube"]], "image 0: 2 boxes but 1 region captions"),
    ],
)
def test_bad_boxes_name_image_and_box(boxes, captions, message):
    with pytest.raises(ValueError, match=message):
        processor()(images=[scene()], input_boxes=boxes, region_captions=captions)


@torch.no_grad()
def test_outputs_feed_cloc_model_and_round_trip(tmp_path):
    proc = processor()
    images = [scene(), scene().rotate(90, expand=True)]
    inputs = proc(
        images=images,
        text=["a white box", "a rotated box"],
        input_boxes=[[[10, 5, 30, 25], [0, 0, 60, 40]], [[5, 10, 25, 30]]],
        region_captions=[["white box", "whole image"], ["white box"]],
    )
    assert inputs["box_mask"].tolist() == [[True, True], [True, False]]
    assert inputs["region_input_ids"].shape[:2] == (2, 2)
    torch.manual_seed(0)
    text = clip_vocab_text_config()
    model = CLOCModel(CLOCConfig(text_config=text, vision_config=tiny_vision_config(), projection_dim=24)).eval()
    out = model(**inputs, return_loss=True)  # the processor's outputs are exactly model inputs
    assert torch.isfinite(out.loss) and out.loss_region is not None
    proc.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLOCProcessor)
    again = reloaded(images=images, input_boxes=[[[10, 5, 30, 25]], [[5, 10, 25, 30]]])
    torch.testing.assert_close(again["input_boxes"][:, 0], inputs["input_boxes"][:, 0])


@pytest.mark.slow
def test_remote_code_processor_in_clean_venv(clean_python, tmp_path):
    from tests.isolated_python import run_isolated

    folder = tmp_path / "processor"
    proc = processor()
    proc.save_pretrained(folder)
    scene().save(tmp_path / "scene.png")
    expected = proc(images=[scene()], input_boxes=[[[10, 5, 30, 25], [0, 0, 5, 40]]], region_captions=[["a", "b"]])
    run_isolated(
        clean_python,
        f"""
        import torch
        from PIL import Image
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(proc).__module__.startswith("transformers_modules"), type(proc).__module__
        out = proc(images=[Image.open({str(tmp_path / "scene.png")!r})], input_boxes=[[[10, 5, 30, 25], [0, 0, 5, 40]]],
                   region_captions=[["a", "b"]])
        torch.save(dict(out), "out.pt")
        """,
        tmp_path,
    )
    got = torch.load(tmp_path / "out.pt")
    assert got.keys() == dict(expected).keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], atol=0, rtol=0)
