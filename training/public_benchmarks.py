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
- **COCO region classification**: a COCO instances JSON (`instances_val2017.json`: `images` with `id` and
  `file_name`, `annotations` with `image_id`, `bbox` `[x, y, w, h]`, `category_id`, `iscrowd`, and `categories`
  with `id` and `name`) and the image folder (`val2017/`). Every non-crowd box is classified among all category
  names.
- **RefCOCO / RefCOCO+ / RefCOCOg** (the `refer` toolkit's layout): `DIR/refs(unc).p` (or `refs(google).p`, or the
  same records as `refs.json`): a list of `{"ref_id", "ann_id", "image_id", "split", "sentences": [{"sent": str}]}`;
  `DIR/instances.json` (COCO format, the referred boxes); COCO train2014 images in `IMAGES/`. Each sentence is
  one grounding query whose target is its annotation's box.

Image names read from annotation files must resolve inside the image folder (`processing.files.read_image_file`).
"""

import io
import json
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from processing.files import read_image_file
from processing.images import to_rgb

from .evaluation import ImageTextScorer, box_iou, grounding_accuracy, topk_accuracy, winoground_scores


def open_image_file(name, root, where: str) -> Image.Image:
    """The RGB image `name` inside folder `root` (refused outside it), or a `ValueError` naming it."""
    data = read_image_file(name, root, where)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            return to_rgb(opened, where)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{where}: {name!r} in {root} is not a readable image ({error})") from None


@dataclass
class PairwiseSample:
    """An image with a positive and a negative caption; `group` is ARO's relation or attribute pair."""

    image_path: Path
    positive: str
    negative: str
    crop: tuple | None = None
    group: str | None = None
    root: Path | None = None  # the image folder `image_path` must stay inside
    name: str | None = None  # `image_path` relative to `root`, as the annotation file gives it

    def image(self) -> Image.Image:
        """The RGB image (cropped to `crop` when given)."""
        if self.root is not None:
            image = open_image_file(self.name, self.root, str(self.image_path))
        else:
            with Image.open(self.image_path) as opened:
                image = to_rgb(opened, str(self.image_path))
        return image.crop(self.crop) if self.crop else image


@dataclass
class RegionImage:
    """One image with pixel boxes `[x0, y0, x1, y1]` and a label per box (an index into the class names)."""

    name: str
    root: Path
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)

    def image(self) -> Image.Image:
        """The RGB image."""
        return open_image_file(self.name, self.root, f"image {self.name!r}")


@dataclass
class GroundingSample:
    """A referring expression and its target box `[x0, y0, x1, y1]` in pixels of image `name`."""

    name: str
    root: Path
    expression: str
    box: list
    ref_id: int | None = None


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
        if not isinstance(rows, dict):
            raise ValueError(f"{file}: expected an object of {{id: sample}}, got {type(rows).__name__}")
        samples = []
        for key, row in rows.items():
            missing = [f for f in ("filename", "caption", "negative_caption") if f not in row]
            if missing:
                raise ValueError(f"{file.name}, entry {key}: missing {missing}")
            samples.append(
                PairwiseSample(
                    image_dir / row["filename"],
                    row["caption"],
                    row["negative_caption"],
                    root=image_dir,
                    name=row["filename"],
                )
            )
        categories[file.stem] = samples
    return categories


def load_aro(annotation_file, image_dir) -> list[PairwiseSample]:
    """ARO VG-Relation / VG-Attribution samples, each cropped to its annotated box, grouped by `relation_name`
    (VG-Relation) or by the attribute pair `"{attributes[0]}_{attributes[1]}"` (VG-Attribution), as ARO does."""
    rows = _read_json(Path(annotation_file))
    if not isinstance(rows, list):
        raise ValueError(f"{annotation_file}: expected a list of samples, got {type(rows).__name__}")
    image_dir = Path(image_dir)
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
        if "relation_name" in row:
            group = str(row["relation_name"])
        elif isinstance(row.get("attributes"), list) and len(row["attributes"]) == 2:
            group = f"{row['attributes'][0]}_{row['attributes'][1]}"
        else:
            group = None
        samples.append(
            PairwiseSample(
                image_dir / row["image_path"],
                row["true_caption"],
                row["false_caption"],
                crop=(int(x), int(y), int(x + w), int(y + h)),
                group=group,
                root=image_dir,
                name=row["image_path"],
            )
        )
    return samples


def load_winoground(folder) -> list[dict]:
    """Winoground examples: `{"id", "images": [path0, path1], "captions": [caption0, caption1], "root", "names"}`."""
    folder = Path(folder)
    path = folder / "examples.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    examples = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {line_number}: not valid JSON ({error})") from None
        missing = [f for f in ("image_0", "image_1", "caption_0", "caption_1") if f not in row]
        if missing:
            raise ValueError(f"{path}, line {line_number}: missing {missing}")
        names = [f"{row[k]}.png" for k in ("image_0", "image_1")]
        examples.append(
            {
                "id": row.get("id", line_number - 1),
                "images": [folder / "images" / name for name in names],
                "captions": [row["caption_0"], row["caption_1"]],
                "root": folder / "images",  # image names must stay inside it
                "names": names,
            }
        )
    return examples


def load_coco_regions(instances_file, image_dir, max_images: int | None = None) -> tuple[list[RegionImage], list]:
    """`(images, class_names)` from a COCO instances JSON: every non-crowd box with its category; class names in
    category-id order. Images without such boxes are left out; `max_images` keeps the first ones (by image id)."""
    data = _read_json(Path(instances_file))
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{instances_file}: not a COCO instances file (missing {missing})")
    _coco_ids(data, instances_file, ("images", "annotations", "categories"))
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    names = {image["id"]: image["file_name"] for image in data["images"]}
    per_image = defaultdict(list)
    for number, annotation in enumerate(data["annotations"]):
        if annotation.get("iscrowd", 0):
            continue  # crowd regions hold many objects: no single label
        where = f"{instances_file}, annotation {annotation.get('id', number)}"
        if annotation.get("image_id") not in names:
            raise ValueError(f"{where}: image_id {annotation.get('image_id')!r} is not among the images")
        if annotation.get("category_id") not in index_of:
            raise ValueError(f"{where}: category_id {annotation.get('category_id')!r} is not among the categories")
        x, y, w, h = _coco_box(annotation.get("bbox"), where)
        if w < 1 or h < 1:
            continue  # under a pixel: nothing to classify
        per_image[annotation["image_id"]].append(([x, y, x + w, y + h], index_of[annotation["category_id"]]))
    image_dir = Path(image_dir)
    images = [
        RegionImage(names[i], image_dir, [b for b, _ in per_image[i]], [c for _, c in per_image[i]])
        for i in sorted(per_image)
    ]
    if max_images is not None:
        images = images[:max_images]
    if not images:
        raise ValueError(f"{instances_file}: no non-crowd boxes")
    return images, [c["name"] for c in categories]


def _coco_ids(data: dict, path, keys=("images", "annotations")) -> None:
    """Every entry of the COCO lists `keys` is an object with an `id` (the annotation file's own fault otherwise)."""
    for key in keys:
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
        for number, entry in enumerate(data[key]):
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"{path}: {key}[{number}] is not an object with an 'id': {entry!r}"[:300])
            if key == "images" and not isinstance(entry.get("file_name"), str):
                raise ValueError(f"{path}: image {entry['id']!r} has no 'file_name'")
            if key == "categories" and not isinstance(entry.get("name"), str):
                raise ValueError(f"{path}: category {entry['id']!r} has no 'name'")


def _coco_box(bbox, where: str) -> list[float]:
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        raise ValueError(f"{where}: bbox must be [x, y, width, height] numbers, got {bbox!r}")
    return [float(v) for v in bbox]


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain lists, dicts, strings and numbers only: a pickle naming any class or function
    (which could run code) is refused."""

    def find_class(self, module, name):
        raise ValueError(f"refs pickle refers to {module}.{name}; only plain lists, dicts and strings are read")


def _read_refs(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if path.suffix == ".json":
        return _read_json(path)
    with path.open("rb") as handle:
        try:
            # latin1: the refer toolkit's pickles were written by Python 2.
            return _PlainUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError) as error:
            raise ValueError(f"{path}: not a readable pickle ({error})") from None


def find_refs_file(folder) -> Path:
    """The refs file of a `refer` folder: `refs(unc).p`, `refs(umd).p`, `refs(google).p` or `refs.json`."""
    folder = Path(folder)
    for name in ("refs(unc).p", "refs(umd).p", "refs(google).p", "refs.json"):
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: no refs file (refs(unc).p, refs(umd).p, refs(google).p or refs.json)")


def load_refcoco(refs_file, instances_file, image_dir, split: str | None = "val") -> list[GroundingSample]:
    """One `GroundingSample` per sentence of every ref in `split` (`None`: all), its box from the instances."""
    refs = _read_refs(Path(refs_file))
    if not isinstance(refs, list):
        raise ValueError(f"{refs_file}: expected a list of refs, got {type(refs).__name__}")
    data = _read_json(Path(instances_file))
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        raise ValueError(f"{instances_file}: not a COCO instances file (missing {missing})")
    _coco_ids(data, instances_file)
    names = {image["id"]: image["file_name"] for image in data["images"]}
    boxes = {annotation["id"]: annotation.get("bbox") for annotation in data["annotations"]}
    image_dir = Path(image_dir)
    samples = []
    for number, ref in enumerate(refs):
        where = f"{refs_file}, ref {ref.get('ref_id', number) if isinstance(ref, dict) else number}"
        if not isinstance(ref, dict):
            raise ValueError(f"{where}: expected a dict, got {type(ref).__name__}")
        absent = [k for k in ("ann_id", "image_id", "sentences") if k not in ref]
        if absent:
            raise ValueError(f"{where}: missing {absent}")
        if split is not None and ref.get("split") != split:
            continue
        if ref["ann_id"] not in boxes:
            raise ValueError(f"{where}: ann_id {ref['ann_id']!r} is not among the instances' annotations")
        if ref["image_id"] not in names:
            raise ValueError(f"{where}: image_id {ref['image_id']!r} is not among the instances' images")
        x, y, w, h = _coco_box(boxes[ref["ann_id"]], where)
        for sentence in ref["sentences"]:
            text = sentence.get("sent") if isinstance(sentence, dict) else sentence
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: a sentence without text: {sentence!r}")
            samples.append(
                GroundingSample(names[ref["image_id"]], image_dir, text, [x, y, x + w, y + h], ref.get("ref_id"))
            )
    if not samples:
        splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        raise ValueError(f"{refs_file}: no refs in split {split!r} (splits present: {splits})")
    return samples


# ----------------------------------------------------------------------------------------------- evaluation


def _chunks(items: list, size: int, progress: bool, what: str):
    for start in tqdm(range(0, len(items), size), desc=what, unit="batch", disable=not progress):
        yield items[start : start + size]


def macro_accuracy(correct: torch.Tensor, groups: list) -> dict:
    """Accuracy per group and their plain mean (ARO's macro accuracy, every group weighted alike)."""
    by_group = defaultdict(list)
    for hit, group in zip(correct.tolist(), groups):
        by_group[group].append(hit)
    per_group = {str(g): sum(v) / len(v) for g, v in sorted(by_group.items(), key=lambda item: str(item[0]))}
    return {"macro_accuracy": sum(per_group.values()) / len(per_group), "per_group": per_group}


def _pairwise_correct(scorer: ImageTextScorer, samples, batch_size: int, progress: bool) -> torch.Tensor:
    hits = []
    for chunk in _chunks(samples, batch_size, progress, "pairs"):
        images = [sample.image() for sample in chunk]
        positive = scorer.pair_scores(images, [s.positive for s in chunk])
        negative = scorer.pair_scores(images, [s.negative for s in chunk])
        hits.append((positive > negative).cpu())
    return torch.cat(hits)


def evaluate_pairwise(
    scorer: ImageTextScorer, samples: list[PairwiseSample], batch_size: int = 64, progress: bool = False
) -> float:
    """Accuracy of the positive caption scoring above the negative one."""
    if not samples:
        raise ValueError("no samples to evaluate")
    return _pairwise_correct(scorer, samples, batch_size, progress).float().mean().item()


def evaluate_aro(
    scorer: ImageTextScorer,
    samples: list[PairwiseSample],
    batch_size: int = 64,
    progress: bool = False,
    exclude_groups=(),
) -> dict:
    """ARO's metric: `macro_accuracy` (mean over relations / attribute pairs, as the ARO paper reports),
    `per_group`, and the plain `accuracy` over samples. `exclude_groups` (e.g. the symmetric relations that ARO's
    notebook drops from VG-Relation) are left out of `macro_accuracy` only."""
    if not samples:
        raise ValueError("no samples to evaluate")
    correct = _pairwise_correct(scorer, samples, batch_size, progress)
    metrics = {"accuracy": correct.float().mean().item(), "num_samples": len(samples)}
    if all(sample.group is not None for sample in samples):
        metrics.update(macro_accuracy(correct, [sample.group for sample in samples]))
        kept = {g: v for g, v in metrics["per_group"].items() if g not in set(exclude_groups)}
        if exclude_groups:
            if not kept:
                raise ValueError(f"exclude_groups {sorted(exclude_groups)} leave no group to average")
            metrics["macro_accuracy"] = sum(kept.values()) / len(kept)
            metrics["excluded_groups"] = sorted(set(exclude_groups) & set(metrics["per_group"]))
    return metrics


def evaluate_winoground(scorer: ImageTextScorer, examples: list[dict], progress: bool = False) -> dict:
    """Winoground text / image / group scores."""
    scores = []
    for example in tqdm(examples, desc="examples", disable=not progress):
        where = f"Winoground example {example['id']}"
        if "root" in example:
            images = [open_image_file(name, example["root"], where) for name in example["names"]]
        else:
            images = [open_image_file(path.name, path.parent, where) for path in example["images"]]
        scores.append(scorer.similarity(images, example["captions"]).cpu())
    return winoground_scores(torch.stack(scores))


def evaluate_coco_regions(
    scorer: ImageTextScorer,
    images: list[RegionImage],
    class_names: list[str],
    template: str = "{}",
    crop: bool = False,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Top-1 / top-5 region classification of every box among `class_names` (each formatted by `template`).

    With a CLOC model (not `crop`), a box that the processor's centre crop removes has no embedding, scores 0 for
    every class and counts as wrong; `boxes_outside_crop` says how many there were.
    """
    if template.count("{}") != 1:
        raise ValueError(f"template needs exactly one '{{}}' for the class name, got {template!r}")
    texts = [template.format(name) for name in class_names]
    scores, labels = [], []
    for chunk in _chunks(images, batch_size, progress, "images"):
        scores.append(
            scorer.region_scores(
                [item.image() for item in chunk], [item.boxes for item in chunk], texts, crop=crop
            ).cpu()
        )
        labels.extend(label for item in chunk for label in item.labels)
    scores = torch.cat(scores)
    ks = tuple(k for k in (1, 5) if k <= len(class_names))
    metrics = topk_accuracy(scores, torch.tensor(labels), ks=ks)
    metrics.update(num_boxes=len(labels), num_images=len(images))
    if not crop:
        metrics["boxes_outside_crop"] = int((scores == 0).all(-1).sum())
    return metrics


def evaluate_refcoco(
    scorer: ImageTextScorer, samples: list[GroundingSample], batch_size: int = 16, progress: bool = False
) -> dict:
    """Grounding accuracy at IoU 0.5 (`acc@0.5`) of each expression's predicted box (CLOC), and the mean IoU."""
    by_image = defaultdict(list)
    for sample in samples:
        by_image[(sample.root, sample.name)].append(sample)
    groups = list(by_image.values())
    predicted, target = [], []
    for chunk in _chunks(groups, batch_size, progress, "images"):
        images = [open_image_file(group[0].name, group[0].root, f"image {group[0].name!r}") for group in chunk]
        boxes = scorer.ground(images, [[s.expression for s in group] for group in chunk])
        predicted.extend(b.cpu() for b in boxes)
        target.extend(torch.tensor([s.box for s in group]) for group in chunk)
    predicted, target = torch.cat(predicted), torch.cat(target)
    return {
        "acc@0.5": grounding_accuracy(predicted, target),
        "mean_iou": box_iou(predicted, target).mean().item(),
        "num_expressions": len(samples),
    }
