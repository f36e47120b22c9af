"""`CLOCProcessor`: images + boxes in original pixels (+ region captions, image captions) -> `CLOCModel` inputs.

Boxes follow SAM's convention: `input_boxes[image][box] = [x0, y0, x1, y1]` in original pixels. They are mapped
through the image processor's own geometry (shortest-edge resize with per-axis scales, then a centre crop at
`(resized - crop) // 2`), clipped, and normalised to [0, 1] of the processed frame; `post_process_boxes` inverts
the map. A box partly outside the image is clipped; one with less than one pixel left in the processed frame
(cropped away, or shrunk below a pixel) is masked with a warning. Images go through `images.to_rgb` first (the
rule shared with the trainer), so `original_sizes` and the pixels agree for every accepted input.
"""

import math

import numpy as np
import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .clip_tokenizer import bundled_clip_tokenizer
from .images import to_rgb_list

logger = logging.get_logger(__name__)


class CLOCProcessor(ProcessorMixin):
    """Image processor (PIL backend) + CLIP tokenizer (bundled, no download) + box normalisation for CLOC.

    `processor(images=..., text=..., input_boxes=[[[x0, y0, x1, y1], ...], ...], region_captions=[[...], ...])`
    returns `pixel_values`, `input_ids`, `attention_mask`, `input_boxes` (normalised, padded), `box_mask`,
    `region_input_ids`, `region_attention_mask` and `original_sizes` (`[B, 2]` as height, width). Images are PIL
    images, numpy arrays or torch tensors, converted by the rule of `images.py` (strings and URLs are refused).
    """

    model_input_names = [
        "pixel_values",
        "input_ids",
        "attention_mask",
        "input_boxes",
        "box_mask",
        "region_input_ids",
        "region_attention_mask",
    ]

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(
            image_processor if image_processor is not None else CLIPImageProcessorPil(),
            tokenizer if tokenizer is not None else bundled_clip_tokenizer(),
            **kwargs,
        )

    # ------------------------------------------------------------------ geometry

    def frame_transform(self, height: int, width: int) -> tuple[float, float, float, float, int, int]:
        """`(scale_x, scale_y, left, top, frame_width, frame_height)` of the image processor for one image size."""
        ip = self.image_processor
        new_h, new_w = height, width
        if ip.do_resize:
            size = ip.size
            if "shortest_edge" in size:
                short, long = min(height, width), max(height, width)
                new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
                new_h, new_w = (new_long, new_short) if width <= height else (new_short, new_long)
            else:
                new_h, new_w = size["height"], size["width"]
        left = top = 0
        frame_h, frame_w = new_h, new_w
        if ip.do_center_crop:
            frame_h, frame_w = ip.crop_size["height"], ip.crop_size["width"]
            top, left = (new_h - frame_h) // 2, (new_w - frame_w) // 2
        return new_w / width, new_h / height, left, top, frame_w, frame_h

    def normalize_boxes(self, boxes: list, height: int, width: int, image_index: int) -> tuple[list, list[bool]]:
        """Pixel boxes of one image -> normalised boxes of the processed frame and a validity flag per box."""
        sx, sy, left, top, frame_w, frame_h = self.frame_transform(height, width)
        normalized, valid = [], []
        for box_index, box in enumerate(boxes):
            if not isinstance(box, (list, tuple, np.ndarray, torch.Tensor)) or len(box) != 4:
                raise ValueError(f"image {image_index}, box {box_index}: expected [x0, y0, x1, y1], got {box!r}")
            try:
                x0, y0, x1, y1 = (float(v) for v in box)
            except (TypeError, ValueError):
                raise ValueError(
                    f"image {image_index}, box {box_index}: coordinates must be numbers, got {box!r}"
                ) from None
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise ValueError(f"image {image_index}, box {box_index}: {list(box)} holds NaN or infinity")
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"image {image_index}, box {box_index}: {list(box)} needs x1 > x0 and y1 > y0")
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)  # clip to the original image
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
            fx0, fx1 = min(max(x0 * sx - left, 0.0), frame_w), min(max(x1 * sx - left, 0.0), frame_w)
            fy0, fy1 = min(max(y0 * sy - top, 0.0), frame_h), min(max(y1 * sy - top, 0.0), frame_h)
            if fx1 - fx0 < 1 or fy1 - fy0 < 1:
                # Under one processed pixel wide or high: no patch sees it, so it teaches noise (and a zero-width
                # box would be refused by the model).
                where = "lies outside" if fx1 <= fx0 or fy1 <= fy0 else "has less than one pixel visible in"
                logger.warning(
                    f"image {image_index}, box {box_index}: {list(box)} {where} the processed frame "
                    f"({fx1 - fx0:.3g} x {fy1 - fy0:.3g} px of {frame_w} x {frame_h}); masked"
                )
                normalized.append([0.0, 0.0, 1.0, 1.0])
                valid.append(False)
                continue
            normalized.append([fx0 / frame_w, fy0 / frame_h, fx1 / frame_w, fy1 / frame_h])
            valid.append(True)
        return normalized, valid

    def post_process_boxes(self, boxes: torch.Tensor, original_sizes: torch.Tensor) -> torch.Tensor:
        """Normalised boxes of the processed frame `[B, R, 4]` -> original pixel coordinates (inverse map)."""
        out = torch.empty_like(boxes, dtype=torch.float32)
        for b, (height, width) in enumerate(original_sizes.tolist()):
            sx, sy, left, top, frame_w, frame_h = self.frame_transform(int(height), int(width))
            box = boxes[b].float()
            out[b, :, 0::2] = (box[:, 0::2] * frame_w + left) / sx
            out[b, :, 1::2] = (box[:, 1::2] * frame_h + top) / sy
        return out

    # ------------------------------------------------------------------ call

    def __call__(
        self, images=None, text=None, input_boxes=None, region_captions=None, return_tensors="pt", **kwargs
    ) -> BatchFeature:
        """Preprocess images, image captions, boxes and region captions for `CLOCModel` (see the class doc)."""
        data = {}
        if images is not None:
            # The shared rule: 8-bit RGB, odd modes and extreme aspect ratios refused by name.
            images = to_rgb_list(images, **kwargs)
            data.update(self.image_processor(images, return_tensors="pt", **kwargs))
            data["original_sizes"] = torch.tensor([(image.height, image.width) for image in images])
        if text is not None:
            data.update(self.tokenizer(text, padding=True, truncation=True, return_tensors="pt"))
        if input_boxes is not None:
            if images is None:
                raise ValueError("input_boxes need the images they refer to")
            if not isinstance(input_boxes, (list, tuple)) or len(input_boxes) != len(images):
                count = len(input_boxes) if isinstance(input_boxes, (list, tuple)) else type(input_boxes).__name__
                raise ValueError(
                    f"input_boxes must hold one list of boxes per image: {count} for {len(images)} images"
                )
            if region_captions is not None and len(region_captions) != len(images):
                raise ValueError(
                    f"region_captions must hold one list per image: {len(region_captions)} for {len(images)}"
                )
            per_image, masks = [], []
            for i, boxes in enumerate(input_boxes):
                if not isinstance(boxes, (list, tuple)) or any(isinstance(v, (int, float)) for v in boxes):
                    raise ValueError(
                        f"image {i}: input_boxes[{i}] must be a list of [x0, y0, x1, y1] boxes (nesting is "
                        f"[image][box][coordinate]), got {boxes!r}"
                    )
                if region_captions is not None and len(region_captions[i]) != len(boxes):
                    raise ValueError(f"image {i}: {len(boxes)} boxes but {len(region_captions[i])} region captions")
                height, width = data["original_sizes"][i].tolist()
                normalized, valid = self.normalize_boxes(boxes, height, width, i)
                per_image.append(normalized)
                masks.append(valid)
            count = max(1, max(len(b) for b in per_image))
            boxes_tensor = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(len(images), count, 1)
            box_mask = torch.zeros(len(images), count, dtype=torch.bool)
            for i, (normalized, valid) in enumerate(zip(per_image, masks)):
                if normalized:
                    boxes_tensor[i, : len(normalized)] = torch.tensor(normalized)
                    box_mask[i, : len(valid)] = torch.tensor(valid)
            data["input_boxes"], data["box_mask"] = boxes_tensor, box_mask
            if region_captions is not None:
                flat = [caption for captions in region_captions for caption in captions] or [""]
                encoded = self.tokenizer(flat, padding=True, truncation=True, return_tensors="pt")
                length = encoded["input_ids"].shape[1]
                ids = torch.full((len(images), count, length), self.tokenizer.pad_token_id, dtype=torch.long)
                attention = torch.zeros(len(images), count, length, dtype=torch.long)
                position = 0
                for i, captions in enumerate(region_captions):
                    ids[i, : len(captions)] = encoded["input_ids"][position : position + len(captions)]
                    attention[i, : len(captions)] = encoded["attention_mask"][position : position + len(captions)]
                    position += len(captions)
                data["region_input_ids"], data["region_attention_mask"] = ids, attention
        return BatchFeature(data=data, tensor_type=return_tensors)


__all__ = ["CLOCProcessor"]
