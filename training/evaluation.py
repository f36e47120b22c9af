"""Evaluation for CLIP, OC-CLIP and CLOC through one interface: metrics in torch (no `evaluate.load`, which needs
the Hub) and an `ImageTextScorer` that turns any of the three models plus its processor into similarity scores.
"""

from pathlib import Path

import torch

from processing.vesl import box_iou  # noqa: F401  (re-exported: one box IoU for NMS and evaluation)

# ----------------------------------------------------------------------------------------------- metrics


def retrieval_recall(similarity: torch.Tensor, image_of_text: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Image<->text retrieval R@k from `similarity` `[I, T]`; caption t belongs to image `image_of_text[t]`.

    Image->text: an image is a hit when any of its captions ranks in the top k; text->image: the caption's image.
    """
    num_images, num_texts = similarity.shape
    metrics = {}
    text_ranks = similarity.argsort(dim=1, descending=True)  # [I, T]
    owns = image_of_text[text_ranks] == torch.arange(num_images, device=similarity.device)[:, None]
    image_ranks = similarity.t().argsort(dim=1, descending=True)  # [T, I]
    hits = image_ranks == image_of_text[:, None]
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = owns[:, : min(k, num_texts)].any(1).float().mean().item()
        metrics[f"text_to_image_R@{k}"] = hits[:, : min(k, num_images)].any(1).float().mean().item()
    return metrics


def pairwise_accuracy(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Fraction of (image, positive, negative) triples where the positive caption scores strictly higher."""
    return (positive > negative).float().mean().item()


def winoground_scores(scores: torch.Tensor) -> dict:
    """Text / image / group scores from `scores[k, i, j]` = score(image i, caption j) of example k (2 x 2)."""
    s = scores
    text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    return {
        "text_score": text.float().mean().item(),
        "image_score": image.float().mean().item(),
        "group_score": (text & image).float().mean().item(),
    }


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict:
    """Top-k accuracy of `logits` `[N, C]` against `labels` `[N]`."""
    ranked = logits.argsort(dim=1, descending=True)
    return {f"top{k}": (ranked[:, :k] == labels[:, None]).any(1).float().mean().item() for k in ks}


def grounding_accuracy(predicted: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of predicted boxes with IoU >= `threshold` against their targets."""
    return (box_iou(predicted, target) >= threshold).float().mean().item()


# ----------------------------------------------------------------------------------------------- scoring


class ImageTextScorer:
    """Similarities of images and captions for a CLIP, OC-CLIP or CLOC model with its processor.

    `family` is a `training.families.ModelFamily` or its name (`"clip"`, `"occlip"`, `"cloc"`); it says how images
    and captions are encoded and scored. Scores are unscaled similarities (cosine, or OC-CLIP's structured
    `s(x, G)`), comparable within one model. Region scoring and grounding need CLOC (or `crop=True`, which crops
    each box and encodes it as an image: the crop-and-encode CLIP baseline).
    """

    def __init__(self, model, processor, family, batch_size: int = 64, progress: bool = False):
        from .families import get_family

        self.model_family = get_family(family)
        self.family = self.model_family.name
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.progress = progress  # a progress bar over each batched loop (the evaluation command turns it on)

    def _starts(self, count: int, what: str):
        from tqdm.auto import tqdm

        steps = range(0, count, self.batch_size)
        return tqdm(steps, desc=what, unit="batch", leave=False) if self.progress else steps

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    def _pixels(self, images) -> torch.Tensor:
        return self.processor.image_processor(images, return_tensors="pt")["pixel_values"].to(self.device)

    @torch.no_grad()
    def encode_images(self, images):
        """Image features for `score` (normalised embeddings, or OC-CLIP's cached binding features)."""
        parts = [
            self.model_family.encode_image_batch(self.model, self._pixels(images[start : start + self.batch_size]))
            for start in self._starts(len(images), "images")
        ]
        return self.model_family.join_image_features(parts)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], scene_graphs: list | None = None):
        """Text features for `score`; OC-CLIP parses captions (or takes `scene_graphs`)."""
        return self.model_family.encode_texts(self.model, self.processor, texts, self.device, scene_graphs)

    @torch.no_grad()
    def score(self, image_features, text_features) -> torch.Tensor:
        """Similarities `[I, T]`."""
        return self.model_family.score(self.model, image_features, text_features)

    @torch.no_grad()
    def similarity(self, images, texts: list[str]) -> torch.Tensor:
        """`score(encode_images(images), encode_texts(texts))`."""
        return self.score(self.encode_images(images), self.encode_texts(texts))

    @torch.no_grad()
    def pair_scores(self, images, texts: list[str]) -> torch.Tensor:
        """Score of image k with caption k, `[N]`."""
        return self.model_family.pair_scores(self.model, self.encode_images(images), self.encode_texts(texts))

    @torch.no_grad()
    def region_scores(self, images, boxes: list[list[list[float]]], texts: list[str], crop: bool = False):
        """Similarity `[R, C]` of every box (pixel xyxy, listed per image, in order) with class texts `texts`.

        CLOC embeds boxes with its region head; `crop=True` crops each box and encodes it as an image.
        """
        text = self.encode_texts(texts)
        if crop:
            crops = [image.crop(tuple(int(round(v)) for v in box)) for image, bs in zip(images, boxes) for box in bs]
            return self.score(self.encode_images(crops), text)
        if not self.model_family.has_regions:
            raise ValueError("region_scores needs a CLOC model (or crop=True for the crop-and-encode baseline)")
        rows = []
        for start in self._starts(len(images), "regions"):
            chunk = list(images[start : start + self.batch_size])
            inputs = self.processor(
                images=chunk, input_boxes=[list(b) for b in boxes[start : start + self.batch_size]]
            )
            region = self.model.get_region_features(
                pixel_values=inputs["pixel_values"].to(self.device),
                input_boxes=inputs["input_boxes"].to(self.device),
                box_mask=inputs["box_mask"].to(self.device),
            ).region_embeds
            for i, bs in enumerate(boxes[start : start + self.batch_size]):
                rows.append(region[i, : len(bs)])
        return torch.cat(rows) @ text.t()

    @torch.no_grad()
    def ground(self, images, captions: list[list[str]]) -> list[torch.Tensor]:
        """Predicted pixel boxes per image for its region captions (CLOC)."""
        if not self.model_family.has_regions:
            raise ValueError("grounding needs a CLOC model")
        results = []
        for start in self._starts(len(images), "grounding"):
            chunk = list(images[start : start + self.batch_size])
            texts = captions[start : start + self.batch_size]
            dummy = [[[0.0, 0.0, float(im.width), float(im.height)]] * len(t) for im, t in zip(chunk, texts)]
            inputs = self.processor(images=chunk, input_boxes=dummy, region_captions=texts)
            predicted = self.model.ground(
                pixel_values=inputs["pixel_values"].to(self.device),
                input_ids=inputs["region_input_ids"].to(self.device),
                attention_mask=inputs["region_attention_mask"].to(self.device),
            )
            sizes = [(im.height, im.width) for im in chunk]
            pixels = self.processor.post_process_grounding(predicted, target_sizes=sizes)
            results.extend(found["boxes"][: len(t)].cpu() for found, t in zip(pixels, texts))
        return results


DEFAULT_TEMPLATES = ("a {}.", "a photo of a {}.", "an image of a {}.", "a picture of a {}.")


@torch.no_grad()
def zero_shot_scores(scorer: ImageTextScorer, images, class_names: list[str], templates=DEFAULT_TEMPLATES):
    """Class scores `[I, C]`: each class's similarity averaged over the prompt `templates` (`"a photo of a {}."`).

    Scores are averaged rather than text embeddings (CLIP's ensembling), so OC-CLIP, whose caption features are
    scene graphs and not vectors, is ensembled the same way.
    """
    if not class_names:
        raise ValueError("zero-shot classification needs at least one class name")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"each template needs exactly one '{{}}' for the class name; got {bad or 'no templates'}")
    images = list(images)
    image_features = scorer.encode_images(images)
    total = 0
    for template in templates:
        total = total + scorer.score(image_features, scorer.encode_texts([template.format(c) for c in class_names]))
    return total / len(templates)


# ----------------------------------------------------------------------------------------------- synthetic benchmark


def evaluate_rows(scorer: ImageTextScorer, rows: list[dict], images=None) -> dict:
    """Image<->text retrieval R@1/5 of `rows` (`docs/data.md` format; one caption per image) and, where rows carry
    `negatives`, pairwise accuracy per hard-negative kind. `images` are the rows' opened images (else opened)."""
    from .data import open_image

    if not rows:
        raise ValueError("no rows to evaluate")
    images = images if images is not None else [open_image(row, f"row {i}") for i, row in enumerate(rows)]
    similarity = scorer.similarity(images, [row["caption"] for row in rows])
    metrics = retrieval_recall(similarity, torch.arange(len(rows), device=similarity.device), ks=(1, 5))
    kinds = sorted({k for row in rows for k, v in (row.get("negatives") or {}).items() if v})
    for kind in kinds:
        chosen = [i for i, row in enumerate(rows) if (row.get("negatives") or {}).get(kind)]
        subset = [images[i] for i in chosen]
        positive = scorer.pair_scores(subset, [rows[i]["caption"] for i in chosen])
        negative = scorer.pair_scores(subset, [rows[i]["negatives"][kind] for i in chosen])
        metrics[kind] = pairwise_accuracy(positive, negative)
    return metrics


def evaluate_synthetic(scorer: ImageTextScorer, folder, region_mode: str | None = None) -> dict:
    """Metrics of one synthetic split (`training.synthetic`): `evaluate_rows` (retrieval, pairwise accuracy per
    hard-negative kind), and with `region_mode` (`"model"` or `"crop"`) region classification among every
    (colour, shape) phrase of the vocabulary with ground-truth boxes; CLOC also gets grounding accuracy at IoU 0.5."""
    from .data import load_image_text_dataset, open_image

    rows = list(load_image_text_dataset(str(folder), flag="synthetic split"))
    # The split's own folder bounds the image paths, as the trainer's reader does for its data.
    images = [open_image(row, f"row {i}", Path(folder)) for i, row in enumerate(rows)]
    metrics = evaluate_rows(scorer, rows, images)
    if region_mode is not None:
        labels_text = [region["text"] for row in rows for region in row["regions"]]
        classes = sorted(set(labels_text) | _vocabulary_phrases(labels_text))
        metrics.update(evaluate_regions(scorer, rows, images, classes, crop=region_mode == "crop"))
    return metrics


def evaluate_regions(scorer: ImageTextScorer, rows: list[dict], images, classes: list[str], crop: bool = False):
    """Region classification of every ground-truth box among `classes` (each box's `text` must be one) and, for
    CLOC without `crop`, grounding accuracy at IoU 0.5 of each region's text."""
    boxes = [[region["bbox"] for region in row["regions"]] for row in rows]
    labels_text = [region["text"] for row in rows for region in row["regions"]]
    if not labels_text:
        raise ValueError("no regions to evaluate")
    missing = sorted(set(labels_text) - set(classes))
    if missing:
        raise ValueError(f"region texts {missing[:5]} are not among the classes")
    scores = scorer.region_scores(images, boxes, classes, crop=crop)
    labels = torch.tensor([classes.index(t) for t in labels_text], device=scores.device)
    metrics = {"region_classification": topk_accuracy(scores, labels, ks=(1,))["top1"]}
    if not crop and scorer.model_family.has_regions:
        predicted = scorer.ground(images, [[region["text"] for region in row["regions"]] for row in rows])
        target = torch.tensor([b for bs in boxes for b in bs])
        metrics["grounding_acc50"] = grounding_accuracy(torch.cat(predicted), target)
    return metrics


def _vocabulary_phrases(seen: list[str]) -> set:
    """Every colour-shape phrase of the generator's vocabulary (with the size words the data uses)."""
    from .synthetic import COLOURS, SHAPES

    sizes = {t.split()[0] for t in seen if len(t.split()) == 3}
    base = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    return {f"{z} {p}" for z in sizes for p in base} if sizes else base
