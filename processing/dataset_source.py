"""The one reader of `datasets` inputs shared by the trainer and VESL: a `save_to_disk` folder, Parquet files, or a
Hub id (or another local folder) read by `datasets.load_dataset`, with the image and caption columns mapped to
`image` / `caption` as in transformers' `run_clip.py` (`--image_column`, `--caption_column`).

Images stay undecoded (`{"bytes", "path"}`): the caller opens them, so a path is read only inside `root` through
`processing.files.read_image_file`. A column of raw bytes or of file paths becomes such an image column too.
"""

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IMAGE = "image"
CAPTION = "caption"


@dataclass
class DatasetInput:
    """An opened input: the dataset (a `Dataset`, or an `IterableDataset` when streamed), the folder whose files its
    rows may name (`root`; None for a Hub dataset, whose rows may name no local file) and its `kind`."""

    dataset: object
    root: Path | None
    kind: str  # "save_to_disk", "parquet" or "load_dataset"


def is_save_to_disk_folder(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    path = Path(path)
    single = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return path.is_dir() and (single or (path / "dataset_dict.json").is_file())


def parquet_files(source: str) -> list[str]:
    """The Parquet files of `source`: a `.parquet` file, a glob of them or a folder holding them (else empty)."""
    path = Path(source)
    if path.is_dir():
        return sorted(glob.glob(str(path / "*.parquet")))
    matches = sorted(glob.glob(source))
    return matches if matches and all(m.endswith(".parquet") for m in matches) else []


def is_hub_id(source: str) -> bool:
    """Whether `source` reads as a Hub dataset id (`owner/name`) rather than a local path."""
    return bool(HUB_ID.match(source)) and not source.startswith((".", "/", "~")) and not Path(source).exists()


def open_dataset(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    streaming: bool = False,
    image_column: str = IMAGE,
    caption_column: str | None = CAPTION,
    flag: str = "--input",
    require_caption: bool = True,
) -> DatasetInput:
    """`source` opened as a `datasets` dataset with its columns mapped (`map_columns`).

    A `save_to_disk` folder is loaded with `load_from_disk` (`split` picks from a `DatasetDict`); Parquet files
    with the `parquet` builder; anything else (a Hub id, a local dataset repository) with
    `load_dataset(source, config_name, split=split, streaming=streaming)`. `ValueError` names `flag` and the problem.
    Without `require_caption`, a missing caption column is no error (VESL can write captions itself).
    """
    import datasets

    path = Path(source)
    if is_save_to_disk_folder(path):
        if config_name is not None:
            raise ValueError(f"{flag} {source}: a save_to_disk folder has no configurations (got {config_name!r})")
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{flag} {source}: no split {split!r} (splits: {list(dataset)})")
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset()
        opened = DatasetInput(dataset, path.resolve(), "save_to_disk")
    elif files := parquet_files(source):
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming)
        # Rows may name files next to any of the Parquet files (one folder, or the glob's common folder).
        root = Path(_common_folder([Path(f).resolve().parent for f in files]))
        opened = DatasetInput(dataset, root, "parquet")
    elif path.exists() or is_hub_id(source):
        try:
            dataset = datasets.load_dataset(source, config_name, split=split, streaming=streaming)
        except Exception as error:  # datasets raises many types (missing repo, offline, unknown format)
            if "Unknown split" in str(error) or "Bad split" in str(error):
                raise ValueError(f"{flag} {source}: no split {split!r} ({error})") from error
            raise ValueError(f"{flag} {source}: could not be loaded as a dataset ({error})") from error
        opened = DatasetInput(dataset, path.resolve() if path.is_dir() else None, "load_dataset")
    else:
        raise ValueError(f"{flag} {source}: no such file or folder, and not a Hub dataset id (owner/name)")
    columns = column_names(opened.dataset)
    if not require_caption and columns is not None and caption_column not in columns:
        caption_column = None
    opened.dataset = map_columns(opened.dataset, image_column, caption_column, f"{flag} {source}")
    return opened


def _common_folder(folders: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f) for f in folders]))


def column_names(dataset) -> list[str] | None:
    """The dataset's columns, or None for a streamed format that only knows them once read."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(dataset.features) if dataset.features else None


def map_columns(dataset, image_column: str = IMAGE, caption_column: str | None = CAPTION, where: str = "dataset"):
    """`dataset` with `image_column` renamed to `image` (undecoded; a column of bytes or paths becomes an `Image`
    column) and `caption_column` to `caption` (an existing `caption` column is replaced). `ValueError` naming the
    available columns when either is missing; `caption_column=None` maps no caption."""
    from datasets import Image, Value

    columns = column_names(dataset)
    if columns is None:  # known once rows are read: renamed lazily, checked per row by the caller
        for column, name in ((image_column, IMAGE), (caption_column, CAPTION)):
            if column is not None and column != name:
                dataset = dataset.rename_column(column, name)
        return dataset
    for column, role in ((image_column, "image"), (caption_column, "caption")):
        if column is not None and column not in columns:
            raise ValueError(f"{where}: no {role} column {column!r} (columns: {columns})")
    for column, name in ((image_column, IMAGE), (caption_column, CAPTION)):
        if column is not None and column != name:
            if name in columns:  # the named column wins, as in run_clip.py
                dataset = dataset.remove_columns(name)
            dataset = dataset.rename_column(column, name)
    feature = dataset.features[IMAGE] if dataset.features else None
    if isinstance(feature, Image) or (
        isinstance(feature, Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")
    ):
        # Undecoded: paths are opened by the caller, only inside the dataset folder.
        dataset = dataset.cast_column(IMAGE, Image(decode=False))
    return dataset
