"""Region-level calls on a `CLOCModel` + `CLOCProcessor`, in pixels of the original image.

- `classify_regions(model, processor, image, boxes, class_names)`: each box's class among `class_names`
  (`logits`, `scores`, `labels` per box).
- `ground_phrases(model, processor, image, phrases)`: one predicted box per phrase, in original pixels (the
  processor's resize and centre crop undone by `CLOCProcessor.post_process_grounding(target_sizes=)`).
- `retrieve_regions(model, processor, image, boxes, texts)`: the box that best matches each text.

Boxes are `[x0, y0, x1, y1]` in original pixels. A box that the processor's centre crop removes (or shrinks
below one processed pixel) has no region embedding: it is reported with `valid=False`, gets no label, and is
never retrieved. No transformers pipeline fits these tasks (zero-shot object detection proposes its own boxes),
so they are plain functions.
"""

import torch
from torch import nn

from .images import to_rgb

__all__ = ["classify_regions", "ground_phrases", "region_logit_scale", "retrieve_regions", "text_embeddings"]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_texts(texts, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"{what} must be a non-empty list of non-empty strings, got {texts!r}")
    return texts


@torch.no_grad()
def text_embeddings(model, processor, texts: list[str], templates=("{}",)) -> torch.Tensor:
    """Normalised text embeddings `[T, D]`; with several `templates`, the renormalised mean over them (CLIP's
    prompt ensembling)."""
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the text; got {bad or 'no templates'}")
    total = 0
    for template in templates:
        tokens = processor.tokenizer(
            [template.format(t) for t in texts], padding=True, truncation=True, return_tensors="pt"
        ).to(_device(model))
        embeds = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        total = total + nn.functional.normalize(embeds.pooler_output, dim=-1)
    return nn.functional.normalize(total, dim=-1)


def region_logit_scale(model) -> torch.Tensor:
    """The trained region-text temperature `exp(region_logit_scale)`, clamped as in training
    (`CLOCModel.clamped_region_logit_scale`)."""
    return model.clamped_region_logit_scale()


@torch.no_grad()
def _region_features(model, processor, image, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised region embeddings `[R, D]` of pixel `boxes` of one image, and their validity `[R]`."""
    if not isinstance(boxes, (list, tuple)) or not boxes:
        raise ValueError(f"boxes must be a non-empty list of [x0, y0, x1, y1] pixel boxes, got {boxes!r}")
    inputs = processor(images=[image], input_boxes=[[list(map(float, box)) for box in boxes]])
    device = _device(model)
    features = model.get_region_features(
        pixel_values=inputs["pixel_values"].to(device),
        input_boxes=inputs["input_boxes"].to(device),
        box_mask=inputs["box_mask"].to(device),
    ).region_embeds
    return features[0, : len(boxes)], inputs["box_mask"][0, : len(boxes)].to(device)


@torch.no_grad()
def classify_regions(model, processor, image, boxes, class_names, templates=("{}",)) -> dict:
    """Classify each pixel box of `image` among `class_names`.

    Returns `logits` `[R, C]` (`region_logit_scale * cosine`), `scores` `[R]` (softmax probability of the chosen
    class), `label_ids` `[R]` (-1 for an invalid box), `labels` (class names, `None` for an invalid box) and
    `valid` `[R]`.
    """
    class_names = _check_texts(class_names, "class_names")
    regions, valid = _region_features(model, processor, image, boxes)
    text = text_embeddings(model, processor, class_names, templates)
    logits = region_logit_scale(model) * regions @ text.t()
    probabilities = logits.softmax(-1)
    scores, label_ids = probabilities.max(-1)
    label_ids = torch.where(valid, label_ids, torch.full_like(label_ids, -1))
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    labels = [class_names[i] if i >= 0 else None for i in label_ids.tolist()]
    return {"logits": logits, "scores": scores, "label_ids": label_ids, "labels": labels, "valid": valid}


@torch.no_grad()
def ground_phrases(model, processor, image, phrases) -> torch.Tensor:
    """Predicted boxes `[P, 4]` for `phrases` (a string or a list), as `[x0, y0, x1, y1]` in pixels of `image`.

    The model predicts boxes in the processed (resized, centre-cropped) frame; they are mapped back to the
    original image, so a box can only cover the part of the image that the crop keeps.
    """
    phrases = _check_texts(phrases, "phrases")
    image = to_rgb(image)  # its size is the target size of the boxes, by the processor's own image rule
    inputs = processor(images=[image])
    tokens = processor.tokenizer(phrases, padding=True, truncation=True, return_tensors="pt")
    device = _device(model)
    predicted = model.ground(
        pixel_values=inputs["pixel_values"].to(device),
        input_ids=tokens["input_ids"][None].to(device),
        attention_mask=tokens["attention_mask"][None].to(device),
    )
    return processor.post_process_grounding(predicted, target_sizes=[(image.height, image.width)])[0]["boxes"].cpu()


@torch.no_grad()
def retrieve_regions(model, processor, image, boxes, texts) -> dict | list[dict]:
    """The best box among pixel `boxes` of `image` for each text.

    For one text (a string) returns `{"index", "box", "scores"}`: `scores` `[R]` are cosines of every box with
    the text (`-inf` for invalid boxes); for a list of texts, a list of such dicts.
    """
    single = isinstance(texts, str)
    texts = _check_texts(texts, "texts")
    regions, valid = _region_features(model, processor, image, boxes)
    if not valid.any():
        raise ValueError(f"no box of {boxes!r} is visible in the processed frame; nothing to retrieve")
    scores = text_embeddings(model, processor, texts) @ regions.t()  # [T, R]
    scores = scores.masked_fill(~valid[None], float("-inf"))
    results = []
    for row in scores:
        index = int(row.argmax())
        results.append({"index": index, "box": list(boxes[index]), "scores": row})
    return results[0] if single else results
