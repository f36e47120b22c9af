"""Issue 14: bad inputs to the processors and the models are refused by name or handled correctly, never silently
misread (image modes, float/integer pixels, cropped boxes, extreme aspect ratios, URLs, mismatched batches)."""

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, CLIPImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_cloc import CLOCModel, CLOCVisionConfig, CLOCVisionModel
from modeling_occlip import OCCLIPModel
from processing import CLOCProcessor, OCCLIPProcessor
from processing.images import MAX_ASPECT_RATIO, to_rgb
from tests.factories import (
    PAD_ID,
    encode_graphs,
    example_graphs,
    phrase_tokens,
    random_pixels,
    tiny_clip_model,
    tiny_cloc_model,
    tiny_occlip_model,
    tiny_vision_config,
)
from training.data import open_image


def small_image_processor(size: int = 32) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def cloc_processor(size: int = 32) -> CLOCProcessor:
    return CLOCProcessor(small_image_processor(size))


def occlip_processor(size: int = 32) -> OCCLIPProcessor:
    return OCCLIPProcessor(small_image_processor(size))


def gradient(height: int = 40, width: int = 60, seed: int = 0) -> np.ndarray:
    """A mid-range uint8 RGB test picture (values 40..215, so saturation shows)."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(height, width, 3), dtype=np.uint8)


def pixels(processor, image) -> torch.Tensor:
    return processor(images=[image])["pixel_values"][0]


# ---------------------------------------------------------------------------------------------- item 8: boxes


@pytest.mark.parametrize("size, box", [((400, 200), [0, 0, 100, 200]), ((640, 480), [0, 0, 80, 480])])
def test_box_with_less_than_one_visible_pixel_is_masked_with_a_warning(size, box, caplog):
    with caplog.at_level(logging.WARNING):
        out = CLOCProcessor()(images=[Image.new("RGB", size)], input_boxes=[[box, [150, 0, 250, 200]]])
    assert out["box_mask"].tolist() == [[False, True]]
    assert "image 0, box 0" in caplog.text and "less than one pixel visible" in caplog.text


def test_box_shrunk_below_a_pixel_by_the_resize_is_masked(caplog):
    # 640 x 640 -> 32 x 32: a 10-px-wide box becomes half a pixel.
    with caplog.at_level(logging.WARNING):
        out = cloc_processor()(images=[Image.new("RGB", (640, 640))], input_boxes=[[[0, 0, 10, 640], [0, 0, 40, 40]]])
    assert out["box_mask"].tolist() == [[False, True]]
    assert "image 0, box 0" in caplog.text


# ---------------------------------------------------------------------------------------------- numpy, strings


def test_cloc_processor_takes_numpy_arrays_and_tensors_like_pil():
    array = gradient()
    boxes = [[[10, 5, 30, 25]]]
    proc = cloc_processor()
    reference = proc(images=[Image.fromarray(array)], input_boxes=boxes)
    for image in (array, np.moveaxis(array, -1, 0), torch.from_numpy(array).permute(2, 0, 1)):
        out = proc(images=[image], input_boxes=boxes)
        torch.testing.assert_close(out["pixel_values"], reference["pixel_values"])
        torch.testing.assert_close(out["input_boxes"], reference["input_boxes"])


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_strings_paths_and_urls_are_refused_without_opening_anything(make, tmp_path, monkeypatch):
    path = tmp_path / "picture.png"
    Image.fromarray(gradient()).save(path)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or pytest.fail("Image.open was called"))
    for source in (str(path), path, "https://example.com/cat.png"):
        with pytest.raises(ValueError, match="image 0: got .*never opened"):
            make()(images=source)
    assert not opened


# ---------------------------------------------------------------------------------------------- item 11: aspect


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
@pytest.mark.parametrize("size", [(int(MAX_ASPECT_RATIO) + 10, 1), (1, int(MAX_ASPECT_RATIO) + 10), (8000, 1)])
def test_extreme_aspect_ratio_is_refused_before_resizing(make, size, monkeypatch):
    processor = make()
    resized = []
    monkeypatch.setattr(processor.image_processor, "resize", lambda *a, **k: resized.append(1) or pytest.fail())
    with pytest.raises(ValueError, match=r"image 0: image of size .* has aspect ratio \d+:1, above 50:1"):
        processor(images=[Image.new("L", size)])
    assert not resized


def test_moderate_aspect_ratio_still_works():
    out = cloc_processor()(images=[Image.new("RGB", (400, 10))])
    assert out["pixel_values"].shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------- item 10: modes


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_float_images_in_unit_range_are_not_rescaled_twice(make):
    array = gradient()
    reference = pixels(make(), Image.fromarray(array))
    unit = array.astype(np.float32) / 255
    for image in (unit, unit.astype(np.float64), torch.from_numpy(unit).permute(2, 0, 1)):
        torch.testing.assert_close(pixels(make(), image), reference)


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_float_images_outside_unit_range_are_refused(make):
    with pytest.raises(
        ValueError, match=r"image 0: float image values span \[.*\]; float images must lie in \[0, 1\]"
    ):
        make()(images=[gradient().astype(np.float32)])
    with pytest.raises(ValueError, match="image 1: float image holds NaN"):
        make()(images=[gradient(), np.full((40, 60, 3), np.nan, dtype=np.float32)])


def test_sixteen_bit_images_are_scaled_not_saturated():
    gray = gradient()[..., 0]
    reference = pixels(cloc_processor(), Image.fromarray(gray))
    sixteen = gray.astype(np.uint16) * 257
    for image in (Image.fromarray(sixteen), sixteen, sixteen.astype(">u2")):
        if isinstance(image, Image.Image):
            assert image.mode == "I;16"
        torch.testing.assert_close(pixels(cloc_processor(), image), reference)


def test_float_mode_f_in_unit_range_matches_eight_bit():
    gray = gradient()[..., 0]
    image = Image.fromarray(gray.astype(np.float32) / 255)
    assert image.mode == "F"
    torch.testing.assert_close(pixels(occlip_processor(), image), pixels(occlip_processor(), Image.fromarray(gray)))


def test_ambiguous_and_mask_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match="PIL mode 'I'.*ambiguous"):
        to_rgb(Image.fromarray(np.full((8, 8), 1000, dtype=np.int32)))
    with pytest.raises(ValueError, match="bool array is a mask"):
        to_rgb(np.zeros((8, 8), dtype=bool))
    with pytest.raises(ValueError, match=r"int64 image values span \[0, 1000\]"):
        to_rgb(np.array([[0, 1000], [3, 4]], dtype=np.int64))
    with pytest.raises(ValueError, match="holds no pixel"):
        to_rgb(np.zeros((0, 5, 3), dtype=np.uint8))


def test_rgba_gives_the_same_pixels_in_training_and_in_the_processor():
    rgb = gradient()
    alpha = np.zeros((40, 60, 1), dtype=np.uint8)
    alpha[:, :30] = 255  # left half opaque, right half fully transparent (its colour must not show)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA")
    trained = np.asarray(open_image({"image": rgba}, "row 0"))
    assert (trained[:, 30:] == 255).all() and (trained[:, :30] == rgb[:, :30]).all()
    torch.testing.assert_close(pixels(cloc_processor(), rgba), pixels(cloc_processor(), Image.fromarray(trained)))


def test_training_reader_uses_the_same_rule_for_encoded_files(tmp_path):
    gray = gradient()[..., 0]
    path = tmp_path / "sixteen.png"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    opened = np.asarray(open_image({"image": {"bytes": path.read_bytes(), "path": None}}, "row 0"))
    assert (opened[..., 0] == gray).all()


# ---------------------------------------------------------------------------------------------- property test

MODES = ("L", "RGB", "RGBA", "P", "I;16", "I", "F", "LA")


def random_image(rng: random.Random, mode: str) -> tuple[Image.Image, Image.Image | None]:
    """An image of `mode` made from a mid-range 8-bit truth, and that truth as RGB (None: the mode is refused)."""
    width, height = rng.randint(1, 90), rng.randint(1, 90)
    if rng.random() < 0.15:  # sometimes an extreme strip
        width = rng.randint(int(MAX_ASPECT_RATIO) + 1, 400) * height
    truth = np.asarray(gradient(height, width, seed=rng.randint(0, 10**6)))
    gray = truth[..., 0]
    alpha = np.asarray(gradient(height, width, seed=rng.randint(0, 10**6)))[..., :1]
    white = np.full_like(truth, 255)

    def over_white(colour):
        a = alpha.astype(np.float64) / 255
        return np.round(colour * a + white * (1 - a)).astype(np.uint8)

    if mode == "L":
        return Image.fromarray(gray), Image.fromarray(gray).convert("RGB")
    if mode == "RGB":
        return Image.fromarray(truth), Image.fromarray(truth)
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([truth, alpha], -1), mode="RGBA"), Image.fromarray(over_white(truth))
    if mode == "P":
        image = Image.fromarray(truth).quantize(16)
        return image, image.convert("RGB")
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 257), Image.fromarray(gray).convert("RGB")
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32)), None
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / 255), Image.fromarray(gray).convert("RGB")
    gray3 = np.repeat(gray[..., None], 3, -1)
    image = Image.fromarray(np.concatenate([gray[..., None], alpha], -1), mode="LA")
    return image, Image.fromarray(over_white(gray3))


ARRAY_KINDS = ("uint8 HWC", "uint16 HW", "float32 CHW tensor", "float64 HWC x255", "int64 HWC", "bool HW")


def random_array(rng: random.Random, kind: str):
    """An array or tensor of `kind` made from a mid-range 8-bit truth, and that truth as RGB (None: refused)."""
    width, height = rng.randint(5, 90), rng.randint(5, 90)
    truth = gradient(height, width, seed=rng.randint(0, 10**6))
    gray = truth[..., 0]
    if kind == "uint8 HWC":
        return truth, Image.fromarray(truth)
    if kind == "uint16 HW":
        return gray.astype(np.uint16) * 257, Image.fromarray(gray).convert("RGB")
    if kind == "float32 CHW tensor":
        return torch.from_numpy(truth.astype(np.float32) / 255).permute(2, 0, 1), Image.fromarray(truth)
    if kind == "float64 HWC x255":  # 0-255 floats: ambiguous with [0, 1], refused
        return truth.astype(np.float64), None
    if kind == "int64 HWC":
        return truth.astype(np.int64), Image.fromarray(truth)
    return gray > 128, None


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_random_arrays_give_clip_range_pixels_or_a_clear_error(make):
    rng = random.Random(41)
    processor = make()
    for case in range(24):
        kind = ARRAY_KINDS[case % len(ARRAY_KINDS)]
        image, truth = random_array(rng, kind)
        if truth is None:
            with pytest.raises(ValueError, match="image 0: (float image values span|bool array is a mask)"):
                processor(images=[image])
            continue
        torch.testing.assert_close(pixels(processor, image), pixels(processor, truth), atol=0.05, rtol=0, msg=kind)


def test_a_batched_tensor_is_split_into_images():
    batch = torch.from_numpy(np.stack([gradient(seed=1), gradient(seed=2)])).permute(0, 3, 1, 2).float() / 255
    out = occlip_processor()(images=batch, text=["a red cube", "a blue ball"], paired=True)
    assert out["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="got 2 images and 1 captions"):
        occlip_processor()(images=batch, text=["a red cube"], paired=True)


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_random_modes_and_sizes_give_clip_range_pixels_or_a_clear_error(make):
    rng = random.Random(14)
    processor = make()
    low = (0 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    high = (1 - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    outcomes = {"ok": 0, "refused": 0}
    for case in range(60):
        mode = MODES[case % len(MODES)]
        image, truth = random_image(rng, mode)
        extreme = max(image.size) / min(image.size) > MAX_ASPECT_RATIO
        if truth is None or extreme:
            with pytest.raises(ValueError, match="image 0: (PIL mode 'I'|image of size)"):
                processor(images=[image])
            outcomes["refused"] += 1
            continue
        values = pixels(processor, image)
        assert values.dtype == torch.float32, mode
        for channel in range(3):
            assert low[channel] - 1e-4 <= values[channel].min() and values[channel].max() <= high[channel] + 1e-4
        # The same picture as the 8-bit truth: nothing saturated, nothing darkened (one level of rounding allowed).
        torch.testing.assert_close(values, pixels(processor, truth), atol=0.05, rtol=0, msg=f"mode {mode}")
        outcomes["ok"] += 1
    assert outcomes["ok"] >= 30 and outcomes["refused"] >= 5


# ---------------------------------------------------------------------------------------------- models' input checks


def caption_ids(count: int) -> torch.Tensor:
    return torch.tensor([phrase_tokens([5 + i, 7], 6) for i in range(count)])


def cloc_inputs(images: int = 2, captions: int = 2, size: int = 32) -> dict:
    ids = caption_ids(captions)
    return dict(pixel_values=random_pixels(images, size=size), input_ids=ids, attention_mask=(ids != PAD_ID).long())


@pytest.fixture(scope="module")
def cloc():
    return tiny_cloc_model()


def test_cloc_loss_refuses_mismatched_batches(cloc):
    # Used to return a loss (0.693) for 2 images and 1 caption.
    with pytest.raises(ValueError, match="pairs image k with caption k, but got 2 images and 1 captions"):
        cloc(**cloc_inputs(images=2, captions=1), return_loss=True)
    assert cloc(**cloc_inputs(images=2, captions=1)).logits_per_image.shape == (2, 1)  # scoring stays allowed


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(pixel_values=random_pixels(2, size=16)),
            r"pixel_values has shape \(2, 3, 16, 16\), expected \[batch, 3",
        ),
        (dict(pixel_values=torch.zeros(0, 3, 32, 32)), "pixel_values holds no image"),
        (dict(pixel_values=[[0.0]]), "pixel_values must be a torch.Tensor, got list"),
        (dict(input_ids=None), "needs pixel_values and input_ids"),
        (dict(pixel_values=None), "needs pixel_values and input_ids"),
        (dict(input_ids=torch.tensor([98, 5, 99]), attention_mask=None), r"\[captions, tokens\] tensor, got \(3,\)"),
        (dict(input_ids=torch.zeros(0, 6, dtype=torch.long), attention_mask=None), "no caption or no token"),
        (dict(input_ids=caption_ids(2).float(), attention_mask=None), "integer token ids"),
        (dict(input_ids=caption_ids(2) + 200, attention_mask=None), r"outside the vocabulary \[0, 100\)"),
        (dict(attention_mask=torch.ones(2, 3, dtype=torch.long)), r"attention_mask has shape \(2, 3\), expected"),
        (dict(input_ids=torch.full((2, 20), 5), attention_mask=None), "more than the text tower's max_position"),
    ],
)
def test_cloc_forward_names_bad_inputs(cloc, change, message):
    with pytest.raises(ValueError, match=message):
        cloc(**{**cloc_inputs(), **change})


def test_integer_pixel_values_are_refused_by_every_model(cloc):
    raw = (random_pixels(2).clamp(-1, 1) * 127 + 128).to(torch.uint8)
    message = r"pixel_values has dtype torch.(uint8|int64); the model takes normalised float pixels"
    with pytest.raises(ValueError, match=message):
        cloc(**{**cloc_inputs(), "pixel_values": raw})
    with pytest.raises(ValueError, match=message):
        cloc.get_image_features(raw.long())
    with pytest.raises(ValueError, match=message):
        tiny_occlip_model()(pixel_values=raw, **encode_graphs(example_graphs()[:2]))
    vision = CLOCVisionModel(CLOCVisionConfig(**tiny_vision_config())).eval()
    with pytest.raises(ValueError, match=message):
        vision(pixel_values=raw)


def test_cloc_model_refuses_boxes_thinner_than_one_input_pixel(cloc):
    thin = torch.tensor([[[0.1, 0.1, 0.11, 0.5]], [[0.0, 0.0, 1.0, 1.0]]])  # 0.32 px wide at 32 px
    with pytest.raises(ValueError, match=r"image 0, box 0: .* is 0.32 x 12.8 pixels of the 32-px input"):
        cloc(**cloc_inputs(), input_boxes=thin)
    with pytest.raises(ValueError, match="at least one pixel wide and high"):
        cloc.get_region_features(pixel_values=random_pixels(2), input_boxes=thin)
    masked = torch.tensor([[False], [True]])
    assert cloc(**cloc_inputs(), input_boxes=thin, box_mask=masked).region_embeds.shape == (2, 1, 24)
    one_pixel = torch.tensor([[[0.5, 0.5, 0.5 + 1 / 32, 0.5 + 1 / 32]], [[0.0, 0.0, 1.0, 1.0]]])
    assert cloc.get_region_features(pixel_values=random_pixels(2), input_boxes=one_pixel).region_embeds.shape == (
        2,
        1,
        24,
    )


def test_processor_masked_sliver_reaches_the_model_without_error(cloc, caplog):
    processor = cloc_processor()
    out = processor(images=[Image.new("RGB", (640, 480)), Image.new("RGB", (64, 64))], text=["a", "b"],
                    input_boxes=[[[0, 0, 80, 480]], [[0, 0, 2, 64]]])  # fmt: skip
    assert out["box_mask"].tolist() == [[False], [True]]  # 2 px of 64 is exactly one pixel of 32: kept
    inputs = dict(out)
    inputs["input_ids"] = inputs["input_ids"].clamp(max=99)  # the tiny model's 100-token vocabulary
    assert cloc(**inputs).region_embeds.shape == (2, 1, 24)


# ---------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_occlip_model().save_pretrained(root / "occlip")
    tiny_cloc_model().save_pretrained(root / "cloc")
    tiny_clip_model().save_pretrained(root / "clip")
    return root


@pytest.mark.parametrize("model_class", [OCCLIPModel, CLOCModel])
@pytest.mark.parametrize("folder, saved_type", [("occlip", "occlip"), ("cloc", "cloc")])
def test_from_clip_refuses_a_trained_checkpoint(folders, model_class, folder, saved_type):
    # Used to load the towers and replace the trained heads with random ones, with only a printed report.
    with pytest.raises(ValueError, match=f"from_clip needs a CLIP checkpoint .* holds model_type '{saved_type}'"):
        model_class.from_clip(folders / folder)


@pytest.mark.parametrize(
    "model_class, folder, missing",
    [(CLOCModel, "occlip", "box_head.fc1.bias"), (OCCLIPModel, "cloc", "binding."), (CLOCModel, "clip", "prompter.")],
)
def test_from_pretrained_refuses_missing_weights_by_name(folders, model_class, folder, missing):
    with pytest.raises(ValueError, match=f"not in the checkpoint and would start random: .*{missing}.*model_type '"):
        model_class.from_pretrained(folders / folder)
    model, info = model_class.from_pretrained(folders / folder, output_loading_info=True)  # opt-out: caller checks
    assert any(key.startswith(missing) for key in info["missing_keys"])


def test_complete_checkpoints_and_clip_starts_still_load(folders):
    assert type(AutoModel.from_pretrained(folders / "occlip")) is OCCLIPModel
    assert type(CLOCModel.from_pretrained(folders / "cloc")) is CLOCModel
    assert type(OCCLIPModel.from_clip(folders / "clip")) is OCCLIPModel
    assert type(CLOCModel.from_clip(str(folders / "clip"))) is CLOCModel


@pytest.mark.parametrize("make", [cloc_processor, occlip_processor])
def test_do_rescale_false_is_refused_since_images_are_eight_bit_by_then(make):
    # Used to return 0-255 values normalised as if they were [0, 1] (pixels around +-500).
    with pytest.raises(ValueError, match="do_rescale=False: every image is converted to 8-bit RGB first"):
        make()(images=[gradient().astype(np.float32) / 255], do_rescale=False)
