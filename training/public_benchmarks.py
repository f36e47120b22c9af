"""Loaders for the public compositionality benchmarks in their released file formats, from local folders.

Expected layouts (nothing is downloaded):

- **SugarCrepe**: `DIR/<category>.json` (e.g. `replace_att.json`, `swap_obj.json`), each
  `{"<id>": {"filename": "000000397133.jpg", "caption": str, "negative_caption": str}}`, and the COCO val2017
  images in `IMAGES/`.
- **ARO** (VG-Relation, VG-Attribution): `visual_genome_relation.json` / `visual_genome_attribution.json`, a list of
  `{"image_path": str, "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption", ...}`; images in
  `IMAGES/` (`image_path` relative to it); each image is cropped to its box, as ARO does.
- **Winoground**: `DIR/examples.jsonl` rows `{"id", "image_0", "image_1", "caption_0", "caption_1", ...}` and
  `DIR/images/<image_k>.png`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from processing.images import to_rgb

from .evaluation import ImageTextScorer, pairwise_accuracy, winoground_scores


@dataclass
class PairwiseSample:
    """An image with a positive and a negative caption."""

    image_path: Path
    positive: str
    negative: str
    crop: tuple | None = None

    def image(self) -> Image.Image:
        """The RGB image (cropped to `crop` when given)."""
        with Image.open(self.image_path) as opened:
            image = to_rgb(opened, str(self.image_path))
        return image.crop(self.crop) if self.crop else image


def _read_json(path: Path):
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def load_sugarcrepe(annotation_dir, image_dir) -> dict[str, list[PairwiseSample]]:
    """`{category: samples}` from SugarCrepe's per-category JSON files."""
    annotation_dir, image_dir = Path(annotation_dir), Path(image_dir)
    files = sorted(annotation_dir.glob("*.json"))
    if not files:
        raise ValueError(f"{annotation_dir}: no SugarCrepe <category>.json files")
    categories = {}
    for file in files:
        rows = _read_json(file)
        samples = []
        for key, row in rows.items():
            missing = [f for f in ("filename", "caption", "negative_caption") if f not in row]
            if missing:
                raise ValueError(f"{file.name}, entry {key}: missing {missing}")
            samples.append(PairwiseSample(image_dir / row["filename"], row["caption"], row["negative_caption"]))
        categories[file.stem] = samples
    return categories


def load_aro(annotation_file, image_dir) -> list[PairwiseSample]:
    """ARO VG-Relation / VG-Attribution samples, each cropped to its annotated box."""
    rows = _read_json(Path(annotation_file))
    samples = []
    for index, row in enumerate(rows):
        missing = [
            f
            for f in ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")
            if f not in row
        ]
        if missing:
            raise ValueError(f"{annotation_file}, entry {index}: missing {missing}")
        x, y, w, h = (float(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
        samples.append(
            PairwiseSample(
                Path(image_dir) / row["image_path"],
                row["true_caption"],
                row["false_caption"],
                crop=(int(x), int(y), int(x + w), int(y + h)),
            )
        )
    return samples


def load_winoground(folder) -> list[dict]:
    """Winoground examples: `{"id", "images": [path0, path1], "captions": [caption0, caption1]}`."""
    folder = Path(folder)
    path = folder / "examples.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    examples = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in ("image_0", "image_1", "caption_0", "caption_1") if f not in row]
        if missing:
            raise ValueError(f"{path}, line {line_number}: missing {missing}")
        images = [folder / "images" / f"{row[k]}.png" for k in ("image_0", "image_1")]
        examples.append(
            {"id": row.get("id", line_number - 1), "images": images, "captions": [row["caption_0"], row["caption_1"]]}
        )
    return examples


def evaluate_pairwise(scorer: ImageTextScorer, samples: list[PairwiseSample]) -> float:
    """Accuracy of the positive caption scoring above the negative one."""
    images = [sample.image() for sample in samples]
    positive = scorer.pair_scores(images, [s.positive for s in samples])
    negative = scorer.pair_scores(images, [s.negative for s in samples])
    return pairwise_accuracy(positive, negative)


def evaluate_winoground(scorer: ImageTextScorer, examples: list[dict]) -> dict:
    """Winoground text / image / group scores."""
    import torch

    scores = []
    for example in examples:
        images = []
        for path in example["images"]:
            with Image.open(path) as opened:
                images.append(to_rgb(opened, str(path)))
        scores.append(scorer.similarity(images, example["captions"]))
    return winoground_scores(torch.stack(scores))
