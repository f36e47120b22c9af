"""Input shards and output shards of the VESL pipeline (`processing/vesl.py`), in the `data.md` format.

Inputs are cut into shards identically in every process; each output shard is written under a temporary name and
moved into place with `os.replace` (a killed run leaves no half-written shard), and `finalize_output` merges the
shards' statistics (and, for imagefolder output, their rows into the root `metadata.jsonl`) once all are done.
"""

import glob
import io
import json
import logging
import os
import re
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("imagefolder", "webdataset")
KEPT_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the extensions the CLOC loader reads
STATS_FILE = "stats.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# ------------------------------------------------------------------------------------------------------ inputs


@dataclass
class SourceRow:
    """One input row: a key for messages, the image (bytes, file path or PIL image) and its texts."""

    key: str
    image: object
    text: str = ""
    alt_text: str = ""


@dataclass
class InputShard:
    """A unit of work: rows of the input that become one output shard. `rows()` reads them lazily."""

    index: int
    name: str
    reader: Callable[[], Iterator[SourceRow]]
    num_rows: int | None = None

    def rows(self) -> Iterator[SourceRow]:
        """The shard's rows in a fixed order."""
        return self.reader()


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


def _row_from_fields(key: str, image, fields_: dict, text_column: str) -> SourceRow:
    text = _text(fields_.get(text_column))
    alt_text = _text(fields_.get("alt_text")) or text
    return SourceRow(key=key, image=image, text=text, alt_text=alt_text)


def _imagefolder_shards(folder: Path, rows_per_shard: int, text_column: str) -> list[InputShard]:
    metadata = folder / "metadata.jsonl"
    with open(metadata) as handle:
        num_rows = sum(1 for line in handle if line.strip())
    if num_rows == 0:
        raise ValueError(f"--input {folder}: metadata.jsonl has no rows")

    def reader(start: int, stop: int):
        with open(metadata) as handle:
            lines = (line for line in handle if line.strip())
            for number, line in enumerate(islice(lines, start, stop), start):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{metadata}, line {number + 1}: not valid JSON ({error})") from None
                name = row.get("file_name")
                if not isinstance(name, str):
                    raise ValueError(f"{metadata}, line {number + 1}: no 'file_name'")
                yield _row_from_fields(name, str(folder / name), row, text_column)

    shards = []
    for index, start in enumerate(range(0, num_rows, rows_per_shard)):
        stop = min(start + rows_per_shard, num_rows)
        shards.append(InputShard(index, f"rows {start}-{stop - 1}", partial(reader, start, stop), stop - start))
    return shards


def _tar_rows(path: str, text_column: str) -> Iterator[SourceRow]:
    """Samples of a WebDataset tar (members grouped by key = name up to the first dot of the base name)."""

    def sample(key, parts):
        image = next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
        image = image if image is not None else next((v for e, v in parts.items() if e not in ("json", "txt")), None)
        fields_ = {}
        if "json" in parts:
            try:
                fields_ = json.loads(parts["json"])
            except ValueError:
                logger.warning(f"{path}: sample {key}: unreadable json, texts left empty")
        if "txt" in parts and text_column not in fields_:
            fields_[text_column] = parts["txt"].decode("utf-8", errors="replace")
        return _row_from_fields(key, image, fields_ if isinstance(fields_, dict) else {}, text_column)

    key, parts = None, {}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                directory, base = os.path.split(member.name)
                stem, _, extension = base.partition(".")
                member_key = f"{directory}/{stem}" if directory else stem
                if member_key != key and key is not None:
                    yield sample(key, parts)
                    parts = {}
                key = member_key
                parts[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        # A damaged archive (e.g. cut short by a failed copy) ends the shard, keeping the samples read so far.
        logger.warning(f"{path}: unreadable after sample {key!r} ({error}); the rest of this tar is skipped")
        return
    if key is not None:
        yield sample(key, parts)


def _dataset_rows(dataset, prefix: str, image_column: str, text_column: str) -> Iterator[SourceRow]:
    for number, row in enumerate(dataset):
        yield _row_from_fields(f"{prefix}{number:07d}", row.get(image_column), row, text_column)


def _undecoded(dataset, image_column: str, where: str):
    from datasets import Image as ImageFeature

    features = dataset.features
    if features is None:  # some streamed formats only know their columns once read; rows are checked then
        return dataset
    if image_column not in features:
        raise ValueError(f"--input {where}: no image column {image_column!r} (columns: {list(features)})")
    if isinstance(features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def list_input_shards(
    source: str,
    rows_per_shard: int = 1000,
    split: str = "train",
    image_column: str = "image",
    text_column: str = "caption",
) -> list[InputShard]:
    """The input cut into shards, identically in every process.

    `source` is an imagefolder (folder with `metadata.jsonl`; shards of `rows_per_shard` rows), WebDataset tars
    (a `.tar` file, a glob or a folder of them; one shard per tar), a `save_to_disk` folder (shards of
    `rows_per_shard` rows), Parquet files (one shard per file), or another local folder / Hub dataset id read
    by `datasets.load_dataset(..., streaming=True)` (one shard per data file).
    """
    import datasets

    path = Path(source)
    if any(c in source for c in "*?["):
        matches = sorted(glob.glob(source))
        if not matches:
            raise ValueError(f"--input {source}: the pattern matches no file")
        if all(m.endswith(".tar") for m in matches):
            return [InputShard(i, m, partial(_tar_rows, m, text_column)) for i, m in enumerate(matches)]
        if all(m.endswith(".parquet") for m in matches):
            files = matches
        else:
            raise ValueError(f"--input {source}: a pattern must match only .tar or only .parquet files")
    elif path.exists():
        if path.is_dir() and (path / "metadata.jsonl").is_file():
            return _imagefolder_shards(path, rows_per_shard, text_column)
        tars = [str(path)] if path.suffix == ".tar" else sorted(glob.glob(str(path / "*.tar")))
        if tars:
            return [InputShard(i, t, partial(_tar_rows, t, text_column)) for i, t in enumerate(tars)]
        if path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise ValueError(f"--input {source}: no split {split!r} (splits: {list(dataset)})")
                dataset = dataset[split]
            dataset = _undecoded(dataset, image_column, source)
            shards = []
            for index, start in enumerate(range(0, len(dataset), rows_per_shard)):
                part = dataset.select(range(start, min(start + rows_per_shard, len(dataset))))
                reader = partial(_dataset_rows, part, f"row{start}+", image_column, text_column)
                shards.append(InputShard(index, f"rows {start}-{start + len(part) - 1}", reader, len(part)))
            return shards
        files = [str(path)] if path.suffix == ".parquet" else sorted(glob.glob(str(path / "*.parquet")))
        if not files and not path.is_dir():
            raise ValueError(f"--input {source}: not an imagefolder, WebDataset tar, Parquet file or dataset folder")
    elif _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        files = None
    else:
        raise ValueError(f"--input {source}: no such file or folder")
    if files:
        dataset = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)
    else:
        try:
            dataset = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as error:  # datasets raises many types (missing repo, offline, unknown format)
            raise ValueError(f"--input {source}: could not be loaded as a dataset ({error})") from error
    dataset = _undecoded(dataset, image_column, source)
    count = dataset.num_shards

    def file_rows(index: int) -> Iterator[SourceRow]:
        part = dataset.shard(num_shards=count, index=index)
        return _dataset_rows(part, f"file{index}-", image_column, text_column)

    return [InputShard(i, f"data file {i} of {count}", partial(file_rows, i)) for i in range(count)]


def open_source_image(image) -> tuple[Image.Image, bytes, str]:
    """The RGB image, plus bytes and extension to store it with: the original file when it is JPEG/PNG/WebP
    (no re-encoding), PNG otherwise. Raises on an unreadable image (the caller counts and skips it)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, Image.Image):
        data = None
        opened = image
    else:
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as handle:
                data = handle.read()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            raise ValueError(f"no image (got {type(image).__name__})")
        opened = Image.open(io.BytesIO(data))
    extension = KEPT_IMAGE_FORMATS.get(opened.format or "")
    rgb = opened.convert("RGB")  # decodes the whole file, so a truncated one fails here
    if data is None or extension is None:
        buffer = io.BytesIO()
        rgb.save(buffer, format="PNG")
        data, extension = buffer.getvalue(), "png"
    return rgb, data, extension


# ----------------------------------------------------------------------------------------------------- outputs


@dataclass
class VeslStats:
    """Counters of one shard or a whole run; `summary()` adds the averages and the phrase hit rate."""

    images: int = 0
    unreadable_images: int = 0
    skipped_without_text: int = 0
    empty_generated_captions: int = 0
    images_without_regions: int = 0
    regions: int = 0
    region_tokens: int = 0
    caption_tokens: int = 0
    alt_text_tokens: int = 0
    candidate_phrases: int = 0
    phrases_with_box: int = 0

    def add_image(self, caption: str, alt_text: str, phrases: list[str], regions: list[dict]) -> None:
        """Count one written row (tokens are whitespace-separated words)."""
        self.images += 1
        self.regions += len(regions)
        self.images_without_regions += not regions
        self.region_tokens += sum(len(r["text"].split()) for r in regions)
        self.caption_tokens += len(caption.split())
        self.alt_text_tokens += len(alt_text.split())
        self.candidate_phrases += len(phrases)
        self.phrases_with_box += len({r["text"] for r in regions})

    def merge(self, other: "VeslStats") -> "VeslStats":
        """Sum of two counters."""
        return VeslStats(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def summary(self) -> dict:
        """Counters plus regions per image, tokens per region / caption / alt-text and the phrase hit rate."""

        def ratio(a, b):
            return round(a / b, 4) if b else 0.0

        return {
            **asdict(self),
            "regions_per_image": ratio(self.regions, self.images),
            "tokens_per_region": ratio(self.region_tokens, self.regions),
            "tokens_per_caption": ratio(self.caption_tokens, self.images),
            "tokens_per_alt_text": ratio(self.alt_text_tokens, self.images),
            "phrase_hit_rate": ratio(self.phrases_with_box, self.candidate_phrases),
        }


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def _add_to_tar(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: a rerun writes identical bytes
    archive.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes one output shard under temporary names; `commit()` moves it into place, `abort()` removes it."""

    def __init__(self, output_dir: Path, index: int, output_format: str):
        self.output_dir, self.index, self.format = Path(output_dir), index, output_format
        self.name = f"{index:05d}"
        self.suffix = f".tmp-{os.getpid()}"
        self.count = 0
        self._remove_leftovers()
        if output_format == "webdataset":
            self.final = self.output_dir / f"{self.name}.tar"
            self.partial = self.final.with_name(self.final.name + self.suffix)
            self.archive = tarfile.open(self.partial, "w", format=tarfile.USTAR_FORMAT)
            self.rows = None
        else:
            self.final = self.output_dir / "annotations" / f"{self.name}.jsonl"
            self.images = self.output_dir / "images" / self.name
            self.partial = self.images.with_name(self.name + self.suffix)
            self.partial.mkdir(parents=True)
            self.rows = []

    def _remove_leftovers(self) -> None:
        """Temporary files of this shard left by a killed run (any process id)."""
        for path in glob.glob(str(self.output_dir / f"{self.name}.tar.tmp-*")):
            os.unlink(path)
        for path in glob.glob(str(self.output_dir / "images" / f"{self.name}.tmp-*")):
            shutil.rmtree(path, ignore_errors=True)

    def add(self, record: dict, image_bytes: bytes, extension: str) -> None:
        """Append one row (the `data.md` fields) and its image."""
        key = f"{self.name}_{self.count:06d}"
        self.count += 1
        if self.format == "webdataset":
            _add_to_tar(self.archive, f"{key}.{extension}", image_bytes)
            _add_to_tar(self.archive, f"{key}.json", json.dumps(record).encode())
        else:
            (self.partial / f"{key}.{extension}").write_bytes(image_bytes)
            self.rows.append({"file_name": f"images/{self.name}/{key}.{extension}", **record})

    def commit(self, stats: VeslStats) -> None:
        """Stats first, then the shard's data; the data file's presence marks the shard finished."""
        write_atomically(self.output_dir / "stats" / f"{self.name}.json", json.dumps(asdict(stats)))
        if self.format == "webdataset":
            self.archive.close()
            os.replace(self.partial, self.final)
            return
        if self.images.exists():
            shutil.rmtree(self.images)  # left by a run killed between the two moves below
        os.replace(self.partial, self.images)
        write_atomically(self.final, "".join(json.dumps(row) + "\n" for row in self.rows))

    def abort(self) -> None:
        """Remove the temporary files of an unfinished shard."""
        if self.format == "webdataset":
            self.archive.close()
            self.partial.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.partial, ignore_errors=True)


def shard_is_done(output_dir: Path, index: int, output_format: str) -> bool:
    """Whether output shard `index` was committed (its stats and data file exist)."""
    name = f"{index:05d}"
    data = Path(output_dir) / (f"{name}.tar" if output_format == "webdataset" else f"annotations/{name}.jsonl")
    return data.is_file() and (Path(output_dir) / "stats" / f"{name}.json").is_file()


def finalize_output(output_dir: Path, num_shards: int, output_format: str) -> dict | None:
    """When every shard is done: total stats into `stats.json` (and, for imagefolder, all rows into
    `metadata.jsonl`); returns the summary, or None (with a warning) while shards are missing."""
    missing = [i for i in range(num_shards) if not shard_is_done(output_dir, i, output_format)]
    if missing:
        logger.warning(f"{len(missing)} of {num_shards} shards unfinished (first: {missing[0]}); rerun to resume")
        return None
    total = VeslStats()
    for index in range(num_shards):
        total = total.merge(VeslStats(**json.loads((output_dir / "stats" / f"{index:05d}.json").read_text())))
    if output_format == "imagefolder":
        temporary = output_dir / f".metadata.jsonl.tmp-{os.getpid()}"
        with open(temporary, "w") as out:
            for index in range(num_shards):
                with open(output_dir / "annotations" / f"{index:05d}.jsonl") as shard:
                    shutil.copyfileobj(shard, out)
        os.replace(temporary, output_dir / "metadata.jsonl")
    summary = {"shards": num_shards, **total.summary()}
    write_atomically(output_dir / STATS_FILE, json.dumps(summary, indent=2))
    return summary
