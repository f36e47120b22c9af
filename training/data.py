"""Training data in the one format of `docs/data.md`: imagefolder + `metadata.jsonl`, Parquet, or WebDataset shards,
loaded with `datasets` under explicit features and collated through the model's processor. A `save_to_disk`
folder, Parquet files and Hub ids are opened by `processing.dataset_source` (the reader VESL shares), which maps
`--image_column` / `--caption_column` to `image` / `caption` as transformers' `run_clip.py` does.

Bad rows (unreadable image, malformed regions or scene graph) are an error naming the row, or are skipped and
counted with `on_bad_sample="skip"`. A `metadata.jsonl` line that breaks the types of `docs/data.md` (not JSON, a bbox
that is not 4 numbers, ...) is such a bad row too, found when the dataset is loaded.

Image files are read only inside the dataset folder (after resolving symlinks), only if they are regular files
(a FIFO or device would block or never end) and only up to `processing.files.MAX_IMAGE_BYTES`.
"""

import glob
import io
import json
import os
import tarfile
from pathlib import Path

import datasets
import torch
from datasets import Features, Image, List, Value
from PIL import Image as PILImage

from processing import files
from processing.boxes import box_problem
from processing.dataset_parsing import SCENE_GRAPH_FEATURE
from processing.dataset_source import is_hub_id, is_save_to_disk_folder, map_columns, open_dataset, parquet_files
from processing.images import to_rgb
from processing.rule_parser import caption_preview, caption_problem

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


class MetadataError(ValueError):
    """A `metadata.jsonl` line that breaks the `docs/data.md` format; the message names the file and line."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_regions_types(regions) -> list[dict]:
    if not isinstance(regions, list):
        raise ValueError(f"regions {regions!r} is not a list")
    checked = []
    for index, region in enumerate(regions):
        if not isinstance(region, dict):
            raise ValueError(f"region {index} {region!r} is not an object")
        bbox = region.get("bbox")
        # The format only (what Arrow can hold); values are the collator's per-row check, by the same rule.
        problem = box_problem(bbox, "bbox", values=False)
        if problem is not None:
            raise ValueError(f"region {index}: {problem}")
        if region.get("text") is not None and not isinstance(region["text"], str):
            raise ValueError(f"region {index}: text {region['text']!r} is not a string")
        if region.get("score") is not None and not _is_number(region["score"]):
            raise ValueError(f"region {index}: score {region['score']!r} is not a number")
        checked.append({"bbox": bbox, "text": region.get("text"), "score": region.get("score")})
    return checked


def _check_scene_graph_types(graph) -> dict:
    if not isinstance(graph, dict):
        raise ValueError(f"scene_graph {graph!r} is not an object")
    objects, relations = graph.get("objects") or [], graph.get("relations") or []
    if not isinstance(objects, list) or not isinstance(relations, list):
        raise ValueError("scene_graph objects and relations must be lists")
    checked_objects = []
    for index, item in enumerate(objects):
        attributes = item.get("attributes") if isinstance(item, dict) else None
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("name"), str)
            or not isinstance(attributes or [], list)
            or not all(isinstance(a, str) for a in attributes or [])
        ):
            raise ValueError(f"scene_graph object {index} {item!r} needs a name string and a list of attributes")
        checked_objects.append({"name": item["name"], "attributes": list(attributes or [])})
    checked_relations = []
    for index, relation in enumerate(relations):
        if not isinstance(relation, dict):
            raise ValueError(f"scene_graph relation {index} {relation!r} is not an object")
        subject, predicate, target = relation.get("subject"), relation.get("predicate"), relation.get("object")
        # Missing or out-of-range indices are the collator's per-row check; only what Arrow cannot hold is refused.
        if not all(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**31) for v in (subject, target)
        ):
            raise ValueError(f"scene_graph relation {index}: subject/object {subject!r}/{target!r} are not indices")
        if predicate is not None and not isinstance(predicate, str):
            raise ValueError(f"scene_graph relation {index}: predicate {predicate!r} is not a string")
        checked_relations.append({"subject": subject, "predicate": predicate, "object": target})
    return {"objects": checked_objects, "relations": checked_relations}


def _check_metadata_row(row) -> dict:
    """The row with its fields in their `docs/data.md` types (regions and scene-graph entries keep only the schema's
    keys), or `ValueError` saying what breaks the format. Values (box order, relation indices) are checked later,
    per row, by the collator."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    name = row.get("file_name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file_name {name!r} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"file_name {name!r} is not a path inside the dataset folder")
    for text in ("caption", "alt_text"):
        if row.get(text) is not None and not isinstance(row[text], str):
            raise ValueError(f"{text} {row[text]!r} is not a string")
    row = dict(row)
    if row.get("regions") is not None:
        row["regions"] = _check_regions_types(row["regions"])
    if row.get("scene_graph") is not None:
        row["scene_graph"] = _check_scene_graph_types(row["scene_graph"])
    negatives = row.get("negatives")
    if negatives is not None and (
        not isinstance(negatives, dict) or not all(v is None or isinstance(v, str) for v in negatives.values())
    ):
        raise ValueError(f"negatives {negatives!r} is not an object of caption strings")
    for key, value in row.items():  # fields outside docs/data.md are kept as strings (numbers written as JSON)
        if key not in FIELD_FEATURES and key != "file_name" and value is not None and not isinstance(value, str):
            row[key] = json.dumps(value)
    try:  # JSON's "\ud800" escapes decode to lone surrogates, which Arrow (UTF-8) cannot hold
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        bad = error.object[error.start : error.end]
        raise ValueError(f"a string is not valid Unicode ({error.reason}: {bad!r})") from None
    return row


def read_metadata(folder: Path, on_bad_sample: str = "error") -> tuple[list[dict], int]:
    """The rows of `folder/metadata.jsonl` checked against `docs/data.md`, and the number of bad lines skipped.

    A bad line (not JSON, a field of the wrong type) raises `MetadataError` naming the file and line, or with
    `on_bad_sample="skip"` is dropped and counted. Each row gets `image = {"path", "bytes": None}`.
    """
    if on_bad_sample not in ("error", "skip"):
        raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
    metadata = folder / "metadata.jsonl"
    rows, skipped = [], 0
    with open(metadata, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                # utf-8-sig on line 1: editors on Windows write a byte-order mark that JSON does not allow
                row = _check_metadata_row(json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8")))
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                if on_bad_sample == "error":
                    raise MetadataError(f"{metadata}, line {number}: {error}") from None
                skipped += 1
                continue
            row["image"] = {"path": str(folder.absolute() / row.pop("file_name")), "bytes": None}
            rows.append(row)
    return rows, skipped


def _from_metadata(folder: Path, split: str, streaming: bool, on_bad_sample: str):
    """`(dataset, skipped)` of an imagefolder, built from the checked `metadata.jsonl` rows.

    Columns are every `docs/data.md` field that any row has, typed by the schema (never inferred from the first row),
    and the dataset lives in memory: no `datasets` cache, so a run cannot depend on whether one exists.
    """
    rows, skipped = read_metadata(folder, on_bad_sample)
    if not rows:
        raise ValueError(f"{folder / 'metadata.jsonl'} is empty: no rows" + (f" ({skipped} bad)" if skipped else ""))
    present = set().union(*(row.keys() for row in rows)) - {"image"}
    columns = [c for c in FIELD_FEATURES if c in present] + sorted(present - set(FIELD_FEATURES))
    features = _features_for(columns)
    table = {name: [row.get(name) for row in rows] for name in features}
    dataset = datasets.Dataset.from_dict(table, features=features, split=datasets.Split(split))
    if skipped:
        print(f"{folder / 'metadata.jsonl'}: skipped {skipped} bad lines (--on_bad_sample skip)")
    return (dataset.to_iterable_dataset() if streaming else dataset), skipped


def load_image_text_dataset(
    path: str,
    split: str = "train",
    streaming: bool = False,
    on_bad_sample: str = "error",
    image_column: str = "image",
    caption_column: str = "caption",
    config_name: str | None = None,
    flag: str = "--train_data",
):
    """A `datasets` dataset of rows `{"image": {"bytes"/"path"}, "caption", ...}` from any supported input.

    Images stay undecoded (the collator opens them, so an unreadable file is a per-row error, not a crash inside
    `datasets`). Raises `ValueError` for a missing path, an empty dataset or a missing image / caption column; a bad
    `metadata.jsonl` line is an error naming it, or skipped with `on_bad_sample="skip"` (`load_training_data`
    also returns the count).
    """
    return load_training_data(
        path, split, streaming, on_bad_sample, image_column, caption_column, config_name=config_name, flag=flag
    )[0]


def load_training_data(
    path: str,
    split: str = "train",
    streaming: bool = False,
    on_bad_sample: str = "error",
    image_column: str = "image",
    caption_column: str = "caption",
    config_name: str | None = None,
    flag: str = "--train_data",
):
    """`(dataset, skipped)`: `load_image_text_dataset`'s dataset and the number of bad metadata lines skipped.

    `path` is an imagefolder with `metadata.jsonl`, WebDataset `.tar` shards, or what
    `processing.dataset_source.open_dataset` reads (the reader VESL shares): a `save_to_disk` folder, Parquet
    files, or a Hub dataset id (`config_name` picks its configuration). `image_column` / `caption_column` name the
    columns that become `image` and `caption` (as in transformers' `run_clip.py`).
    """
    folder = Path(path)
    skipped = 0
    where = f"{flag} {path}"
    if folder.is_dir() and (folder / "metadata.jsonl").is_file():
        dataset, skipped = _from_metadata(folder, split, streaming, on_bad_sample)
        dataset = map_columns(dataset, image_column, caption_column, where)
    elif is_save_to_disk_folder(folder) or parquet_files(path) or is_hub_id(path):
        opened = open_dataset(
            path,
            split=split,
            config_name=config_name,
            streaming=streaming,
            image_column=image_column,
            caption_column=caption_column,
            flag=flag,
        )
        dataset = opened.dataset
    elif files := _data_files(path, ".tar"):
        shard_features, row_features = _webdataset_features(files[0])
        dataset = datasets.load_dataset(
            "webdataset", data_files=files, split="train", streaming=streaming, features=shard_features
        )
        dataset = dataset.map(_from_webdataset, remove_columns=list(shard_features), features=row_features)
        dataset = map_columns(dataset, image_column, caption_column, where)
    else:
        raise ValueError(
            f"{where}: expected a folder with metadata.jsonl, a save_to_disk folder, Parquet files, WebDataset .tar "
            "shards or a Hub dataset id (owner/name)"
        )
    if not streaming and len(dataset) == 0:
        raise ValueError(f"{where}: the dataset has no rows")
    return dataset, skipped


def holds_splits(path: str) -> bool:
    """Whether `path` is an input with named splits (a `DatasetDict` save_to_disk folder or a Hub id) rather than one
    set of rows (imagefolder, Parquet, shards, a saved `Dataset`)."""
    folder = Path(path)
    if folder.is_dir() and (folder / "metadata.jsonl").is_file():
        return False
    if is_save_to_disk_folder(folder):
        return (folder / "dataset_dict.json").is_file()
    return is_hub_id(path)


def evaluation_split(path: str, split: str | None, flag: str = "--eval_data") -> str:
    """The split of `path` to evaluate on (`--eval_split`). An input with named splits defaults to `validation`, the
    split transformers' `run_clip.py` evaluates; one set of rows has no split to choose, so naming one is a
    `ValueError` (a missing split of an input that has them is one too, raised when it is opened)."""
    if not holds_splits(path):
        if split is not None:
            raise ValueError(
                f"--eval_split {split}: {flag} {path} is a single set of rows (imagefolder, Parquet, shards or a "
                "saved Dataset) with no splits to choose from; give the evaluation rows their own folder, or save a "
                "DatasetDict"
            )
        return "train"
    return split if split is not None else "validation"


def data_root(path: str) -> Path | None:
    """The folder whose files a dataset's rows may read: the dataset folder, or the folder of its Parquet or
    shard files (None when `path` names nothing local, e.g. a Hub id: its rows may then name no file)."""
    folder = Path(path)
    if folder.is_dir():
        return folder.resolve()
    files = parquet_files(path) or _data_files(path, ".tar")
    return Path(os.path.commonpath([str(Path(f).resolve().parent) for f in files])) if files else None


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
    """The feature of an extra (non-`docs/data.md`) json field: a string, number or bool."""
    for kind, feature in ((bool, "bool"), (int, "int64"), (float, "float64"), (str, "string")):
        if isinstance(value, kind):
            return Value(feature)
    raise ValueError(f"{where}: json field {name!r} is not in docs/data.md and not a string, number or bool")


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


def open_image(row: dict, where: str, root: Path | None = None, local_files: bool = True) -> PILImage.Image:
    """The row's image as RGB, or `BadSample` naming the row. A path is read with
    `processing.files.read_image_file`'s checks (inside `root` when given, a regular file, under the size cap);
    with `local_files=False` (a Hub dataset, which has no folder of its own) no path is read at all."""
    image = row.get("image")
    try:
        if isinstance(image, PILImage.Image):
            return to_rgb(image)  # the processors' rule, so training and inference see the same pixels
        if image is None:
            raise ValueError("no image")
        if isinstance(image, (bytes, bytearray, str)):  # a streamed column whose type was unknown when opened
            image = {"bytes": bytes(image), "path": None} if not isinstance(image, str) else {"path": image}
        if not image.get("bytes") and not local_files:
            raise files.RefusedFile(
                f"image path {image.get('path')!r} refused: this dataset has no local folder to read files from"
            )
        data = image["bytes"] if image.get("bytes") else files.read_image_file(image["path"], root, where)
        if len(data) > files.MAX_IMAGE_BYTES:
            raise ValueError(f"{len(data)} image bytes, over the limit of {files.MAX_IMAGE_BYTES}")
        with PILImage.open(io.BytesIO(data)) as opened:
            return to_rgb(opened)
    except Exception as error:  # PIL raises many types for corrupt files
        raise BadSample(f"{where}: unreadable image ({error})") from None


def check_regions(regions, where: str) -> tuple[list[list[float]], list[str]]:
    """Boxes and texts of a row's `regions`, or `BadSample` for a bbox that breaks `processing.boxes`' rule
    (4 finite numbers with x1 > x0 and y1 > y0) or an empty text."""
    boxes, texts = [], []
    for index, region in enumerate(regions or []):
        bbox = region.get("bbox") if isinstance(region, dict) else None
        problem = box_problem(bbox, "bbox")
        if problem is not None:
            raise BadSample(f"{where}, region {index}: {problem}")
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
    """Rows -> model inputs through the family's processor (`family`: a `training.families.ModelFamily` or its
    name, `clip`, `occlip` or `cloc`), which says what a row must carry and how rows become inputs.

    `on_bad_sample="skip"` drops bad rows and counts them in the batch (`SKIPPED_KEY`, which the trainer pops);
    `"error"` raises `BadSample` naming the row. With `root`, image paths must resolve inside that folder; with
    `local_files=False` (a Hub dataset) no image path is read.
    OC-CLIP uses a row's cached `scene_graph` when present and parses the caption otherwise.
    """

    def __init__(
        self,
        processor,
        family,
        on_bad_sample: str = "error",
        max_regions: int | None = None,
        hard_negatives: bool = False,
        root: Path | None = None,
        local_files: bool = True,
    ):
        from .families import get_family  # families reads rows with this module's checks

        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.family = get_family(family)
        if hard_negatives and self.family.name != "clip":
            raise ValueError(f"hard negatives are a CLIP baseline; the {self.family.name} collator does not take them")
        self.processor, self.on_bad_sample = processor, on_bad_sample
        self.max_regions, self.hard_negatives = max_regions, hard_negatives
        self.root = root  # image paths must resolve inside it (the dataset folder)
        self.local_files = local_files

    def _prepare(self, row: dict, where: str, index: int) -> dict:
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise BadSample(f"{where}: empty caption")
        # Too long to parse, or not UTF-8 (a lone surrogate): a bad row here, not a crash later in the parser.
        problem = caption_problem(caption)
        if problem is not None:
            raise BadSample(f"{where}: caption {caption_preview(caption)} {problem}")
        prepared = {"image": open_image(row, where, self.root, self.local_files), "caption": caption}
        if self.hard_negatives:
            prepared["negative"] = pick_hard_negative(row.get("negatives"), index, where)
        return {**prepared, **self.family.prepare_row(row, where, self.max_regions)}

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
        return {**self.family.model_inputs(self.processor, prepared), SKIPPED_KEY: torch.tensor(skipped)}
