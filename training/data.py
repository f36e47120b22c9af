"""Training data in the one format of `data.md`: imagefolder + `metadata.jsonl`, Parquet, or WebDataset shards,
loaded with `datasets` under explicit features and collated through the model's processor.

Bad rows (unreadable image, malformed regions or scene graph) are an error naming the row, or are skipped and
counted with `on_bad_sample="skip"`.
"""

import glob
import io
import json
import math
import tarfile
from pathlib import Path

import datasets
import torch
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from processing.dataset_parsing import SCENE_GRAPH_FEATURE
from processing.images import to_rgb
from processing.scene_graph import SceneGraph

SKIPPED_KEY = "skipped_rows"  # per-batch count of rows dropped by on_bad_sample="skip"

REGION_FEATURE = List({"bbox": List(Value("float32"), length=4), "text": Value("string"), "score": Value("float32")})
NEGATIVES_FEATURE = {
    name: Value("string") for name in ("attribute_swap", "relation_swap", "shape_replace", "colour_replace")
}
FIELD_FEATURES = {
    "caption": Value("string"),
    "alt_text": Value("string"),
    "scene_graph": SCENE_GRAPH_FEATURE,
    "regions": REGION_FEATURE,
    "negatives": NEGATIVES_FEATURE,
}


def _features_for(columns) -> Features:
    unknown = [c for c in columns if c not in FIELD_FEATURES and c not in ("image", "file_name")]
    fields = {c: FIELD_FEATURES[c] for c in columns if c in FIELD_FEATURES}
    fields.update({c: Value("string") for c in unknown})
    return Features({"image": Image(decode=False), **fields})


def load_image_text_dataset(path: str, split: str = "train", streaming: bool = False):
    """A `datasets` dataset of rows `{"image": {"bytes"/"path"}, "caption", ...}` from any of the three layouts.

    Images stay undecoded (the collator opens them, so an unreadable file is a per-row error, not a crash inside
    `datasets`). Raises `ValueError` for a missing path, an empty dataset or a missing `caption` column.
    """
    folder = Path(path)
    if folder.is_dir() and (folder / "metadata.jsonl").is_file():
        with open(folder / "metadata.jsonl") as handle:
            first = handle.readline().strip()
        if not first:
            raise ValueError(f"{folder / 'metadata.jsonl'} is empty: no rows")
        columns = list(json.loads(first))
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=str(folder), split=split, features=_features_for(columns), streaming=streaming
        )
    elif files := _data_files(path, ".parquet"):
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
        dataset = dataset.cast_column("image", Image(decode=False))
    elif files := _data_files(path, ".tar"):
        shard_features, row_features = _webdataset_features(files[0])
        dataset = datasets.load_dataset(
            "webdataset", data_files=files, split="train", streaming=streaming, features=shard_features
        )
        dataset = dataset.map(_from_webdataset, remove_columns=list(shard_features), features=row_features)
    else:
        raise ValueError(
            f"--train_data {path}: expected a folder with metadata.jsonl, Parquet files or WebDataset .tar shards"
        )
    if not streaming and len(dataset) == 0:
        raise ValueError(f"--train_data {path}: the dataset has no rows")
    columns = dataset.column_names or (list(dataset.features) if dataset.features else None)
    if columns is not None and "caption" not in columns:
        raise ValueError(f"--train_data {path}: no 'caption' column (columns: {columns})")
    return dataset


def _data_files(path: str, suffix: str) -> list[str]:
    """The `suffix` files of a folder, or of a glob / file path ending in `suffix` (empty when neither)."""
    folder = Path(path)
    if folder.is_dir():
        return sorted(glob.glob(str(folder / f"*{suffix}")))
    return sorted(glob.glob(str(path))) if str(path).endswith(suffix) else []


IMAGE_EXTENSIONS = ("jpg", "png", "webp", "jpeg")


def _webdataset_features(first_shard: str) -> tuple[Features, Features]:
    """Explicit features of WebDataset samples and of the rows made from them, from the first sample of
    `first_shard` (image extension, extra json fields). Inferred types break when the first samples have, say,
    `"regions": []` and later ones boxes."""
    extensions, fields = set(), {}
    with tarfile.open(first_shard) as tar:
        first_key = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if first_key is not None and key != first_key:
                break
            first_key = key
            extensions.add(extension.lower())
            if extension.lower() == "json":
                fields = json.loads(tar.extractfile(member).read())
    images = [e for e in IMAGE_EXTENSIONS if e in extensions]
    if not images or "json" not in extensions:
        raise ValueError(f"{first_shard}: the first sample needs an image ({'/'.join(IMAGE_EXTENSIONS)}) and a json")
    extra = {k: _scalar_feature(k, v, first_shard) for k, v in fields.items() if k not in FIELD_FEATURES}
    json_fields = {**extra, **FIELD_FEATURES}
    columns = {"__key__": Value("string"), "__url__": Value("string"), "json": json_fields}
    shard = Features({**columns, **{e: Image(decode=False) for e in images}})
    return shard, Features({"image": Image(decode=False), **json_fields})


def _scalar_feature(name: str, value, where: str) -> Value:
    """The feature of an extra (non-`data.md`) json field: a string, number or bool."""
    for kind, feature in ((bool, "bool"), (int, "int64"), (float, "float64"), (str, "string")):
        if isinstance(value, kind):
            return Value(feature)
    raise ValueError(f"{where}: json field {name!r} is not in data.md and not a string, number or bool")


def _from_webdataset(sample: dict) -> dict:
    image = next((sample[k] for k in IMAGE_EXTENSIONS if sample.get(k) is not None), None)
    fields = sample.get("json") or {}
    if isinstance(fields, (bytes, str)):
        fields = json.loads(fields)
    if isinstance(image, PILImage.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image = {"bytes": buffer.getvalue(), "path": None}
    return {"image": image, **fields}


class IndexedRows(torch.utils.data.Dataset):
    """A map-style dataset whose rows also carry their index (`__index__`), so errors can name the row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "__index__": index}


class IndexedStream(torch.utils.data.IterableDataset):
    """A streamed dataset whose rows carry their position in this process's stream (`__index__`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for index, row in enumerate(self.dataset):
            yield {**row, "__index__": index}


class BadSample(ValueError):
    """A row that breaks the dataset format; the message names the row."""


def open_image(row: dict, where: str) -> PILImage.Image:
    """The row's image as RGB, or `BadSample` naming the row."""
    image = row.get("image")
    try:
        if isinstance(image, PILImage.Image):
            return to_rgb(image)  # the processors' rule, so training and inference see the same pixels
        if image is None:
            raise ValueError("no image")
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with PILImage.open(source) as opened:
            return to_rgb(opened)
    except Exception as error:  # PIL raises many types for corrupt files
        raise BadSample(f"{where}: unreadable image ({error})") from None


def check_regions(regions, where: str) -> tuple[list[list[float]], list[str]]:
    """Boxes and texts of a row's `regions`, or `BadSample` for a bbox that is not 4 finite numbers with
    x1 > x0 and y1 > y0."""
    boxes, texts = [], []
    for index, region in enumerate(regions or []):
        bbox = region.get("bbox") if isinstance(region, dict) else None
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
        ):
            raise BadSample(f"{where}, region {index}: bbox {bbox!r} is not 4 finite numbers")
        if bbox[2] <= bbox[0] or bbox[3] <= bbox[1]:
            raise BadSample(f"{where}, region {index}: bbox {list(bbox)} needs x1 > x0 and y1 > y0")
        text = region.get("text")
        if not isinstance(text, str) or not text.strip():
            raise BadSample(f"{where}, region {index}: empty region text")
        boxes.append([float(v) for v in bbox])
        texts.append(text)
    return boxes, texts


def pick_hard_negative(negatives, index: int, where: str) -> str:
    """One hard-negative caption of a row for NegCLIP-style training: its kinds (sorted) taken in turn by row
    index, so every kind is used about equally and the choice is the same in every process and worker."""
    kinds = sorted(k for k, v in (negatives or {}).items() if isinstance(v, str) and v.strip())
    if not kinds:
        raise BadSample(f"{where}: no hard-negative caption in `negatives` (--hard_negatives needs one per row)")
    return negatives[kinds[index % len(kinds)]]


class TrainingCollator:
    """Rows -> model inputs through the family's processor (`clip`, `occlip` or `cloc`).

    `on_bad_sample="skip"` drops bad rows and counts them in the batch (`SKIPPED_KEY`, which the trainer pops);
    `"error"` raises `BadSample` naming the row.
    OC-CLIP uses a row's cached `scene_graph` when present and parses the caption otherwise.
    """

    def __init__(
        self,
        processor,
        family: str,
        on_bad_sample: str = "error",
        max_regions: int | None = None,
        hard_negatives: bool = False,
    ):
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        if hard_negatives and family != "clip":
            raise ValueError(f"hard negatives are a CLIP baseline; the {family} collator does not take them")
        self.processor, self.family, self.on_bad_sample = processor, family, on_bad_sample
        self.max_regions, self.hard_negatives = max_regions, hard_negatives

    def _prepare(self, row: dict, where: str, index: int) -> dict:
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSample(f"{where}: empty caption")
        prepared = {"image": open_image(row, where), "caption": caption}
        if self.hard_negatives:
            prepared["negative"] = pick_hard_negative(row.get("negatives"), index, where)
        if self.family == "occlip":
            graph = row.get("scene_graph")
            if graph and graph.get("objects"):
                try:
                    SceneGraph.from_dict(graph)
                except ValueError as error:
                    raise BadSample(f"{where}: malformed scene_graph ({error})") from None
            prepared["scene_graph"] = graph if graph and graph.get("objects") else None
        if self.family == "cloc":
            boxes, texts = check_regions(row.get("regions"), where)
            if self.max_regions is not None:
                boxes, texts = boxes[: self.max_regions], texts[: self.max_regions]
            prepared["boxes"], prepared["texts"] = boxes, texts
        return prepared

    def __call__(self, rows: list[dict]) -> dict:
        """A batch dict of tensors for the model's forward (plus the count of skipped rows)."""
        prepared, skipped = [], 0
        for index, row in enumerate(rows):
            position = row.get("__index__", index)
            where = f"row {position}"
            image = row.get("image")
            if isinstance(image, dict) and image.get("path"):
                where += f" ({Path(image['path']).name})"
            try:
                prepared.append(self._prepare(row, where, position))
            except BadSample:
                if self.on_bad_sample == "error":
                    raise
                skipped += 1
        if not prepared:
            raise BadSample("every row of a batch was bad; nothing to train on")
        images = [p["image"] for p in prepared]
        captions = [p["caption"] for p in prepared]
        if self.family == "clip":
            texts = captions + [p["negative"] for p in prepared] if self.hard_negatives else captions
            out = self.processor(images=images, text=texts, padding=True, truncation=True, return_tensors="pt")
        elif self.family == "occlip":
            graphs = [p["scene_graph"] for p in prepared]
            if any(g is None for g in graphs):
                parsed = self.processor.caption_parser.parse_batch([c for c, g in zip(captions, graphs) if g is None])
                parsed = iter(parsed)
                graphs = [g if g is not None else next(parsed) for g in graphs]
            out = self.processor(images=images, scene_graphs=graphs, paired=True)
        else:
            out = self.processor(
                images=images,
                text=captions,
                input_boxes=[p["boxes"] for p in prepared],
                region_captions=[p["texts"] for p in prepared],
            )
            out.pop("original_sizes", None)
        return {**out, SKIPPED_KEY: torch.tensor(skipped)}
