"""`CLOCProcessor`: images + boxes in original pixels (+ region captions, image captions) -> `CLOCModel` inputs.

Boxes follow SAM's convention: `input_boxes[image][box] = [x0, y0, x1, y1]` in original pixels. They are mapped
through the image processor's own geometry (shortest-edge resize with per-axis scales, then a centre crop at
`(resized - crop) // 2`), clipped, and normalised to [0, 1] of the processed frame. Model boxes go back to pixels
as in OWLv2's `post_process_object_detection`: the caller keeps the original sizes and passes them as
`target_sizes`, so the model inputs carry nothing but model inputs. A box partly outside the image is clipped;
one with less than one pixel left in the processed frame (cropped away, or shrunk below a pixel) is masked with a
warning. Images go through `images.to_rgb` first (the rule shared with the trainer).
"""

import numbers

import numpy as np
import torch
from transformers import CLIPImageProcessorPil
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .boxes import check_box
from .clip_tokenizer import bundled_clip_tokenizer
from .images import to_rgb_list

logger = logging.get_logger(__name__)


class CLOCProcessorKwargs(ProcessingKwargs, total=False):
    """Keyword arguments of `CLOCProcessor.__call__`, per modality as in every transformers processor.

    `text_kwargs` (`padding`, `truncation`, `max_length`, ...) apply to the image captions `text=` exactly as in
    `CLIPProcessor`, and to the region captions, which are always padded at least to the longest one (they form a
    `[images, boxes, tokens]` table). `images_kwargs` go to the image processor; box normalisation follows the
    geometry it is configured with, so a call-time `size` / `crop_size` override is refused.
    """


def _check_target_sizes(target_sizes, batch: int) -> list[tuple[int, int]]:
    """`target_sizes` (`[B, 2]` tensor or list of `(height, width)`) as a list of int pairs, or a `ValueError`."""
    if isinstance(target_sizes, (torch.Tensor, np.ndarray)):
        target_sizes = target_sizes.tolist()
    if not isinstance(target_sizes, (list, tuple)) or len(target_sizes) != batch:
        count = len(target_sizes) if isinstance(target_sizes, (list, tuple)) else type(target_sizes).__name__
        raise ValueError(f"target_sizes must hold one (height, width) per image: {count} for {batch} images")
    sizes = []
    for index, size in enumerate(target_sizes):
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v == int(v) >= 1 for v in size)
        ):
            raise ValueError(f"target_sizes[{index}] = {size!r} is not a (height, width) pair of positive integers")
        sizes.append((int(size[0]), int(size[1])))
    return sizes


class CLOCProcessor(ProcessorMixin):
    """Image processor (PIL backend) + CLIP tokenizer (bundled, no download) + box normalisation for CLOC.

    `processor(images=..., text=..., input_boxes=[[[x0, y0, x1, y1], ...], ...], region_captions=[[...], ...])`
    returns `pixel_values`, `input_ids`, `attention_mask`, `input_boxes` (normalised, padded), `box_mask`,
    `region_input_ids` and `region_attention_mask`: exactly the keyword arguments of `CLOCModel.forward`.
    `padding`, `truncation`, `max_length`, `text_kwargs=`, `images_kwargs=` and `return_tensors` behave as in
    `CLIPProcessor` (`CLOCProcessorKwargs`); the defaults differ only in `padding=True, truncation=True,
    return_tensors="pt"`. Images are PIL images, numpy arrays or torch tensors, converted by the rule of
    `images.py` (strings and URLs are refused). Model boxes go back to pixels with `post_process_boxes` /
    `post_process_grounding(..., target_sizes=)`.
    """

    valid_processor_kwargs = CLOCProcessorKwargs
    # Defaults below the call's own kwargs (transformers' `_merge_kwargs` order): captions of different lengths
    # batch into tensors without extra arguments.
    text_kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

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
        """Pixel boxes of one image -> normalised boxes of the processed frame and a validity flag per box.

        Each box must pass `boxes.check_box` (a `ValueError` names image, box and problem)."""
        sx, sy, left, top, frame_w, frame_h = self.frame_transform(height, width)
        normalized, valid = [], []
        for box_index, box in enumerate(boxes):
            x0, y0, x1, y1 = check_box(box, f"image {image_index}, box {box_index}")
            x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)  # clip to the original image
            y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
            fx0, fx1 = min(max(x0 * sx - left, 0.0), frame_w), min(max(x1 * sx - left, 0.0), frame_w)
            fy0, fy1 = min(max(y0 * sy - top, 0.0), frame_h), min(max(y1 * sy - top, 0.0), frame_h)
            if fx1 - fx0 < 1 or fy1 - fy0 < 1:
                # Under one processed pixel wide or high: no patch sees it, so it teaches noise (and a zero-width
                # box would be refused by the model).
                where = "lies outside" if fx1 <= fx0 or fy1 <= fy0 else "has less than one pixel visible in"
                logger.warning(
                    f"image {image_index}, box {box_index}: {[x0, y0, x1, y1]} {where} the processed frame "
                    f"({fx1 - fx0:.3g} x {fy1 - fy0:.3g} px of {frame_w} x {frame_h}); masked"
                )
                normalized.append([0.0, 0.0, 1.0, 1.0])
                valid.append(False)
                continue
            normalized.append([fx0 / frame_w, fy0 / frame_h, fx1 / frame_w, fy1 / frame_h])
            valid.append(True)
        return normalized, valid

    def post_process_boxes(self, boxes: torch.Tensor, target_sizes) -> torch.Tensor:
        """Normalised xyxy boxes of the processed frame `[B, R, 4]` -> pixels of the original images.

        `target_sizes` holds each original image's `(height, width)` (`[B, 2]` tensor or list of pairs), as in
        OWLv2's `post_process_object_detection`: the inverse of the map `__call__` applies to `input_boxes`.
        """
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
            shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
            raise ValueError(f"boxes has shape {shape}, expected [images, boxes, 4] (normalised x0, y0, x1, y1)")
        sizes = _check_target_sizes(target_sizes, boxes.shape[0])
        out = torch.empty(boxes.shape, dtype=torch.float32, device=boxes.device)
        for b, (height, width) in enumerate(sizes):
            sx, sy, left, top, frame_w, frame_h = self.frame_transform(height, width)
            box = boxes[b].float()
            out[b, :, 0::2] = (box[:, 0::2] * frame_w + left) / sx
            out[b, :, 1::2] = (box[:, 1::2] * frame_h + top) / sy
        return out

    def post_process_grounding(self, outputs, target_sizes=None, grounding_mask=None) -> list[dict]:
        """Grounded boxes per image, in OWLv2's `post_process_object_detection` layout: one dict per image.

        Args:
            outputs: `CLOCModel.ground(...)`'s boxes `[B, R, 4]`, or any model output with `predicted_boxes`
                (then its `grounding_mask`, if any, selects the captions that were grounded).
            target_sizes: `(height, width)` of each original image (`[B, 2]` tensor or list of pairs); `None`
                keeps the boxes normalised to the processed frame, as OWLv2 does.
            grounding_mask: `[B, R]` bool, the captions to keep (default: all, or the output's own mask).

        Returns:
            A list of `{"boxes": [R_b, 4]}` with `[x0, y0, x1, y1]` boxes in pixels of the original image.
        """
        boxes = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "predicted_boxes", None)
        if boxes is None:
            raise ValueError(
                f"post_process_grounding takes CLOCModel.ground's boxes or an output with predicted_boxes, got "
                f"{type(outputs).__name__}"
            )
        if grounding_mask is None and not isinstance(outputs, torch.Tensor):
            grounding_mask = getattr(outputs, "grounding_mask", None)
        if target_sizes is not None:
            boxes = self.post_process_boxes(boxes, target_sizes)
        elif boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"boxes has shape {tuple(boxes.shape)}, expected [images, boxes, 4]")
        if grounding_mask is not None and tuple(grounding_mask.shape) != tuple(boxes.shape[:2]):
            raise ValueError(
                f"grounding_mask has shape {tuple(grounding_mask.shape)}, expected {tuple(boxes.shape[:2])}"
            )
        return [
            {"boxes": boxes[b] if grounding_mask is None else boxes[b][grounding_mask[b].bool()]}
            for b in range(boxes.shape[0])
        ]

    # ------------------------------------------------------------------ call

    def __call__(
        self,
        images=None,
        text=None,
        input_boxes=None,
        region_captions=None,
        **kwargs: Unpack[CLOCProcessorKwargs],
    ) -> BatchFeature:
        """Preprocess images, image captions, boxes and region captions for `CLOCModel` (see the class doc).

        Args:
            images: one image or a list (PIL, numpy or torch; see `images.py`).
            text: image captions, tokenized as `CLIPProcessor` does with the same `text_kwargs`.
            input_boxes: `[image][box] = [x0, y0, x1, y1]` in pixels of the original image (SAM's nesting).
            region_captions: `[image][box]` caption of each box.
            kwargs: `CLOCProcessorKwargs`: `padding`, `truncation`, `max_length`, ..., `text_kwargs=`,
                `images_kwargs=`, `return_tensors`.
        """
        output_kwargs = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_kwargs, images_kwargs = output_kwargs["text_kwargs"], output_kwargs["images_kwargs"]
        return_tensors = text_kwargs.get("return_tensors")
        geometry = sorted({"do_resize", "size", "do_center_crop", "crop_size"} & set(images_kwargs))
        if geometry:
            raise ValueError(
                f"{', '.join(geometry)} given at call time: boxes are normalised (and post-processed) with the image "
                "processor's own geometry, so set it there instead (CLOCProcessor(CLIPImageProcessorPil(...)))"
            )
        if images is None and text is None:
            raise ValueError("CLOCProcessor needs images=, text= or both.")
        data = {}
        if images is not None:
            # The shared rule: 8-bit RGB, odd modes and extreme aspect ratios refused by name.
            images = to_rgb_list(images, **images_kwargs)
            data.update(self.image_processor(images, **images_kwargs))
        if text is not None:
            data.update(self.tokenizer(text, **text_kwargs))
        if input_boxes is not None:
            data.update(self._encode_boxes(images, input_boxes, region_captions, text_kwargs))
        elif region_captions is not None:
            raise ValueError("region_captions need the input_boxes they describe")
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _encode_boxes(self, images, input_boxes, region_captions, text_kwargs: dict) -> dict:
        """`input_boxes`, `box_mask` and (with captions) `region_input_ids` / `region_attention_mask` tensors."""
        if images is None:
            raise ValueError("input_boxes need the images they refer to")
        if not isinstance(input_boxes, (list, tuple)) or len(input_boxes) != len(images):
            count = len(input_boxes) if isinstance(input_boxes, (list, tuple)) else type(input_boxes).__name__
            raise ValueError(f"input_boxes must hold one list of boxes per image: {count} for {len(images)} images")
        if region_captions is not None and len(region_captions) != len(images):
            raise ValueError(f"region_captions must hold one list per image: {len(region_captions)} for {len(images)}")
        per_image, masks = [], []
        for i, boxes in enumerate(input_boxes):
            if not isinstance(boxes, (list, tuple)) or any(isinstance(v, (int, float)) for v in boxes):
                raise ValueError(
                    f"image {i}: input_boxes[{i}] must be a list of [x0, y0, x1, y1] boxes (nesting is "
                    f"[image][box][coordinate]), got {boxes!r}"
                )
            if region_captions is not None and len(region_captions[i]) != len(boxes):
                raise ValueError(f"image {i}: {len(boxes)} boxes but {len(region_captions[i])} region captions")
            normalized, valid = self.normalize_boxes(boxes, images[i].height, images[i].width, i)
            per_image.append(normalized)
            masks.append(valid)
        count = max(1, max(len(b) for b in per_image))
        boxes_tensor = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(len(images), count, 1)
        box_mask = torch.zeros(len(images), count, dtype=torch.bool)
        for i, (normalized, valid) in enumerate(zip(per_image, masks)):
            if normalized:
                boxes_tensor[i, : len(normalized)] = torch.tensor(normalized)
                box_mask[i, : len(valid)] = torch.tensor(valid)
        data = {"input_boxes": boxes_tensor, "box_mask": box_mask}
        if region_captions is not None:
            flat = [caption for captions in region_captions for caption in captions] or [""]
            padding = text_kwargs.get("padding")
            if padding in (None, False, "do_not_pad"):
                padding = "longest"  # the captions of all boxes form one [images, boxes, tokens] table
            encoded = self.tokenizer(flat, **{**text_kwargs, "padding": padding, "return_tensors": "pt"})
            length = encoded["input_ids"].shape[1]
            ids = torch.full((len(images), count, length), self.tokenizer.pad_token_id, dtype=torch.long)
            attention = torch.zeros(len(images), count, length, dtype=torch.long)
            position = 0
            for i, captions in enumerate(region_captions):
                ids[i, : len(captions)] = encoded["input_ids"][position : position + len(captions)]
                attention[i, : len(captions)] = encoded["attention_mask"][position : position + len(captions)]
                position += len(captions)
            data["region_input_ids"], data["region_attention_mask"] = ids, attention
        return data


__all__ = ["CLOCProcessor", "CLOCProcessorKwargs"]
