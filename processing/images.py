"""One image-conversion rule for the processors and the trainer: any accepted input -> an 8-bit RGB PIL image.

Accepted, and what each becomes:
- PIL images. 8-bit modes (`1`, `L`, `P`, `RGB`, `CMYK`, `YCbCr`, ...) convert as PIL converts them. Transparency
  (`RGBA`, `LA`, `PA`, a palette or `L`/`RGB` transparency key) is composited onto white, as transformers' CLIP
  image processor does, so training and inference see the same pixels. 16-bit `I;16*` is scaled by 255/65535.
  Float `F` follows the float-array rule.
- numpy arrays and torch tensors, `[H, W]` or `[H, W, C]` / `[C, H, W]` with C in (1, 3, 4), 4 meaning RGBA:
  uint8 is 0-255; uint16 is 16-bit; other integer types must hold 0-255; floats must lie in [0, 1] (the
  convention of `ToTensor`), so they are never divided by 255 a second time.

Refused by name (`ValueError`): strings, bytes and paths (no file or URL is opened here), mode `I` (32-bit
integers: 8- or 16-bit is ambiguous), floats outside [0, 1], NaN, bool, empty images, and aspect ratios above
`MAX_ASPECT_RATIO`, checked before any pixel is converted: a shortest-edge resize of an 8000 x 1 image to 224 px
would allocate gigabytes.
"""

import numpy as np
import torch
from PIL import Image

# A 50:1 panorama resizes to 224 x 11200 at CLIP's 224 px (7.5 MB); beyond that the image is a strip, not a scene.
MAX_ASPECT_RATIO = 50.0
# Floats a little outside [0, 1] (a bicubic resize overshoots) are clipped; further out they are not [0, 1] images.
_FLOAT_TOLERANCE = 1 / 255
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_size(height: int, width: int, where: str, max_aspect_ratio: float) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{where}: image of size {width} x {height} (width x height) holds no pixel")
    ratio = max(height, width) / min(height, width)
    if ratio > max_aspect_ratio:
        raise ValueError(
            f"{where}: image of size {width} x {height} (width x height) has aspect ratio {ratio:.0f}:1, above "
            f"{max_aspect_ratio:g}:1; resizing its short side would allocate a huge image. Crop or pad it first."
        )


def _from_unit_floats(array: np.ndarray, where: str) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 0-255."""
    if array.size and not np.isfinite(array).all():
        raise ValueError(f"{where}: float image holds NaN or infinity")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        raise ValueError(
            f"{where}: float image values span [{low:g}, {high:g}]; float images must lie in [0, 1]. Pass 0-255 "
            "values as uint8 (e.g. array.astype(np.uint8)), or divide by 255."
        )
    return np.round(np.clip(array, 0.0, 1.0) * 255).astype(np.uint8)


def _to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Pixel values of any accepted dtype -> uint8 0-255 (see the module doc)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        raise ValueError(f"{where}: bool array is a mask, not an image; pass uint8 0-255 or floats in [0, 1]")
    if np.issubdtype(array.dtype, np.floating):
        return _from_unit_floats(array.astype(np.float32), where)
    if array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order
        return np.round(array.astype(np.float32) * (255 / 65535)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(
                f"{where}: {array.dtype} image values span [{low}, {high}]; integer images other than uint16 must "
                "hold 0-255 (give 16-bit images dtype uint16)"
            )
        return array.astype(np.uint8)
    raise ValueError(f"{where}: unsupported pixel dtype {array.dtype}")


def _convert_pil(image: Image.Image, where: str) -> Image.Image:
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image), where)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_from_unit_floats(np.asarray(image, dtype=np.float32), where)).convert("RGB")
    if mode in ("I", "I;32", "I;32L", "I;32B"):
        raise ValueError(
            f"{where}: PIL mode {mode!r} (32-bit integers) is ambiguous: convert 16-bit data to 'I;16' or pass a uint16 "
            "array, and 8-bit data to 'L' or 'RGB'"
        )
    try:
        if mode in _ALPHA_MODES or image.info.get("transparency") is not None:
            # White, as transformers' convert_to_rgb: one rule for every RGBA source, training and inference alike.
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")  # also for RGB: a copy that does not depend on the open file
    except (ValueError, OSError) as error:
        raise ValueError(f"{where}: PIL mode {mode!r} cannot be converted to RGB ({error})") from None


def _channels_last(array: np.ndarray, where: str) -> np.ndarray:
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` -> `[H, W, C]`, C in (1, 3, 4)."""
    if array.ndim == 2:
        return array[..., None]
    if array.ndim == 3:
        last, first = array.shape[-1] in (1, 3, 4), array.shape[0] in (1, 3, 4)
        if last and not first:
            return array
        if first and not last:
            return np.moveaxis(array, 0, -1)
        if last and first:
            raise ValueError(
                f"{where}: array of shape {array.shape} is ambiguous (channels first or last?); pass a PIL image"
            )
    raise ValueError(
        f"{where}: array of shape {tuple(array.shape)} is not an image: expected [H, W], [H, W, C] or [C, H, W] "
        "with C in (1, 3, 4)"
    )


def to_rgb(image, where: str = "image", max_aspect_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """`image` (PIL image, numpy array or torch tensor) as an 8-bit RGB PIL image by the module's rule, or a
    `ValueError` that starts with `where` and names the problem."""
    if isinstance(image, Image.Image):
        _check_size(image.height, image.width, where, max_aspect_ratio)
        return _convert_pil(image, where)
    if isinstance(image, torch.Tensor):
        if image.dtype == torch.bfloat16:  # numpy has no bfloat16
            image = image.float()
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        array = _channels_last(image, where)
        _check_size(array.shape[0], array.shape[1], where, max_aspect_ratio)
        array = _to_uint8(array, where)
        if array.shape[-1] == 4:
            return _convert_pil(Image.fromarray(array, mode="RGBA"), where)
        return Image.fromarray(array if array.shape[-1] == 3 else array[..., 0]).convert("RGB")
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        shown = image if len(str(image)) <= 80 else str(image)[:77] + "..."
        raise ValueError(
            f"{where}: got {type(image).__name__} {shown!r}; images must be PIL images, numpy arrays or torch tensors. "
            "Files and URLs are never opened here (no hidden network access): open them yourself, e.g. "
            "PIL.Image.open(path)."
        )
    raise ValueError(f"{where}: got {type(image).__name__}; images must be PIL images, numpy arrays or torch tensors")


def to_rgb_list(images, max_aspect_ratio: float = MAX_ASPECT_RATIO, **image_kwargs) -> list[Image.Image]:
    """A processor's `images=` (one image, a list, or a batched `[B, ...]` array/tensor) as RGB PIL images;
    errors name the image's index. `image_kwargs` are the overrides the caller passes on to the image processor."""
    if image_kwargs.get("do_rescale") is False:
        # The images are 8-bit by now, so skipping the 1/255 rescale would feed 0-255 values to the model.
        raise ValueError(
            "do_rescale=False: every image is converted to 8-bit RGB first (floats in [0, 1] are read as such), so "
            "the image processor must rescale; drop do_rescale=False."
        )
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("images= is empty")
    return [to_rgb(image, f"image {index}", max_aspect_ratio) for index, image in enumerate(images)]


__all__ = ["MAX_ASPECT_RATIO", "to_rgb", "to_rgb_list"]
