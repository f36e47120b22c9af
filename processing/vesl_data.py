"""Input shards and output shards of the VESL pipeline (`processing/vesl.py`), in the `docs/data.md` format.

Inputs are cut into shards identically in every process; each output shard is written under a temporary name and
moved into place with `os.replace` (a killed run leaves no half-written shard), and `finalize_output` merges the
shards' statistics (and, for imagefolder output, their rows into the root `metadata.jsonl`) once all are done.
"""

import glob
import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from functools import partial
from itertools import islice
from pathlib import Path

from PIL import Image

from . import files
from .dataset_source import CAPTION, IMAGE, is_hub_id, is_save_to_disk_folder, open_dataset
from .files import RefusedFile, folder_overlap, read_image_file
from .images import to_rgb

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("imagefolder", "webdataset")
KEPT_IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # the extensions the CLOC loader reads
STATS_FILE = "stats.json"

# ------------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class LocalImage:
    """An image file named by an input row, read only from inside `root` (the resolved input folder)."""

    root: Path | None  # None: the input has no local folder (a Hub id), so no path may be read
    name: str
    row: str  # where the row is, for messages ("metadata.jsonl line 4")


@dataclass(frozen=True)
class RefusedImage:
    """An image already refused while reading the input (e.g. a tar member over the size cap)."""

    reason: str


def read_local_image(image: LocalImage) -> bytes:
    """The bytes of a row's image file under `processing.files.read_image_file`'s rules; an input without a local
    folder (a Hub dataset) may name no file at all."""
    if image.root is None:
        raise RefusedFile(
            f"{image.row}: image path {image.name!r} refused: this input has no local folder to read files from"
        )
    return read_image_file(image.name, image.root, image.row)


def _image_reference(image, root: Path | None, row: str):
    """A dataset row's image as bytes when it holds them, else a `LocalImage` to be read from inside `root`."""
    if isinstance(image, dict):
        if image.get("bytes"):
            return image["bytes"]
        image = image.get("path")
    if isinstance(image, (str, os.PathLike)):
        return LocalImage(root, os.fspath(image), row)
    return image


@dataclass
class SourceRow:
    """One input row: a key for messages, the image (bytes, PIL image, a `LocalImage` read only from inside the
    input folder, or a `RefusedImage`) and its texts."""

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
    root = folder.resolve()
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
                image = LocalImage(root, name, f"{metadata}, line {number + 1}")
                yield _row_from_fields(name, image, row, text_column)

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
        for text_part in ("json", "txt"):
            if isinstance(parts.get(text_part), RefusedImage):
                logger.warning(parts.pop(text_part).reason + "; texts left empty")
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
                if member.size > files.MAX_IMAGE_BYTES:  # declared size: refused before reading, like a large file
                    reason = f"{path}: sample {key!r}: member {member.name!r} has {member.size:,} bytes, over the cap"
                    parts[extension.lower()] = RefusedImage(reason)
                    continue
                parts[extension.lower()] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        # A damaged archive (e.g. cut short by a failed copy) ends the shard, keeping the samples read so far.
        logger.warning(f"{path}: unreadable after sample {key!r} ({error}); the rest of this tar is skipped")
        return
    if key is not None:
        yield sample(key, parts)


def _dataset_rows(dataset, prefix: str, root: Path | None) -> Iterator[SourceRow]:
    """Rows of a dataset opened by `processing.dataset_source.open_dataset` (columns `image` and `caption`)."""
    for number, row in enumerate(dataset):
        key = f"{prefix}{number:07d}"
        yield _row_from_fields(key, _image_reference(row.get(IMAGE), root, f"row {key}"), row, CAPTION)


def list_input_shards(
    source: str,
    rows_per_shard: int = 1000,
    split: str = "train",
    image_column: str = "image",
    text_column: str = "caption",
) -> list[InputShard]:
    """The input cut into shards, identically in every process.

    `source` is an imagefolder (folder with `metadata.jsonl`; shards of `rows_per_shard` rows), WebDataset tars
    (a `.tar` file, a glob or a folder of them; one shard per tar), or what the trainer also reads through
    `processing.dataset_source.open_dataset`: a `save_to_disk` folder (shards of `rows_per_shard` rows), Parquet
    files (one shard per file), or another local folder / Hub dataset id (streamed; one shard per data file).
    """
    path = Path(source)
    if any(c in source for c in "*?["):
        matches = sorted(glob.glob(source))
        if not matches:
            raise ValueError(f"--input {source}: the pattern matches no file")
        if all(m.endswith(".tar") for m in matches):
            return [InputShard(i, m, partial(_tar_rows, m, text_column)) for i, m in enumerate(matches)]
        if not all(m.endswith(".parquet") for m in matches):
            raise ValueError(f"--input {source}: a pattern must match only .tar or only .parquet files")
    elif path.exists():
        if path.is_dir() and (path / "metadata.jsonl").is_file():
            return _imagefolder_shards(path, rows_per_shard, text_column)
        tars = [str(path)] if path.suffix == ".tar" else sorted(glob.glob(str(path / "*.tar")))
        if tars:
            return [InputShard(i, t, partial(_tar_rows, t, text_column)) for i, t in enumerate(tars)]
        if not path.is_dir() and path.suffix != ".parquet":
            raise ValueError(f"--input {source}: not an imagefolder, WebDataset tar, Parquet file or dataset folder")
    elif not is_hub_id(source):
        raise ValueError(f"--input {source}: no such file or folder")
    # The same reader as the trainer's --dataset_name: a save_to_disk folder whole (cut into row ranges), other
    # inputs streamed (cut by data file).
    whole = is_save_to_disk_folder(path)
    opened = open_dataset(
        source,
        split=split,
        streaming=not whole,
        image_column=image_column,
        caption_column=text_column,
        require_caption=False,  # a captioner may write the captions
    )
    dataset, root = opened.dataset, opened.root  # rows naming an image file may only name files inside `root`
    if whole:
        shards = []
        for index, start in enumerate(range(0, len(dataset), rows_per_shard)):
            part = dataset.select(range(start, min(start + rows_per_shard, len(dataset))))
            reader = partial(_dataset_rows, part, f"row{start}+", root)
            shards.append(InputShard(index, f"rows {start}-{start + len(part) - 1}", reader, len(part)))
        return shards
    count = dataset.num_shards

    def file_rows(index: int) -> Iterator[SourceRow]:
        return _dataset_rows(dataset.shard(num_shards=count, index=index), f"file{index}-", root)

    return [InputShard(i, f"data file {i} of {count}", partial(file_rows, i)) for i in range(count)]


def input_paths(source: str) -> list[Path]:
    """The local files or folders an `--input` reads (the glob's matches, or the path), resolved; [] for a Hub id."""
    if any(c in source for c in "*?["):
        return [Path(m).resolve() for m in sorted(glob.glob(source))]
    path = Path(source)
    return [path.resolve()] if path.exists() else []


def check_output_apart(source: str, output_dir: str) -> None:
    """Refuse an `--output_dir` that is, contains or lies inside the input: VESL writes `metadata.jsonl`, shards and
    image folders there, which would overwrite the input or be read back as input on the next run."""
    output = Path(output_dir).resolve()
    for location in input_paths(source):
        overlap = folder_overlap(output, location)
        if overlap is not None:
            relation = "lies inside" if overlap == "inside" else overlap
            raise ValueError(
                f"--output_dir {output_dir} {relation} the input {location} (--input {source}); VESL would "
                "overwrite or re-read its own input there: choose an output folder outside the input"
            )


def open_source_image(image) -> tuple[Image.Image, bytes, str]:
    """The RGB image, plus bytes and extension to store it with: the original file when it is JPEG/PNG/WebP
    (no re-encoding), PNG otherwise. Raises on an unreadable image (the caller counts and skips it), and
    `RefusedFile` for a file outside the input, not regular or too large (`LocalImage`, `read_local_image`)."""
    if isinstance(image, dict):
        image = image.get("bytes") or image.get("path")
    if isinstance(image, RefusedImage):
        raise RefusedFile(image.reason)
    if isinstance(image, Image.Image):
        data = None
        opened = image
    else:
        if isinstance(image, LocalImage):
            data = read_local_image(image)
        elif isinstance(image, (str, os.PathLike)):  # a path given by the caller directly, not by an input row
            with open(image, "rb") as handle:
                data = handle.read()
        elif isinstance(image, (bytes, bytearray)):
            data = bytes(image)
        else:
            raise ValueError(f"no image (got {type(image).__name__})")
        opened = Image.open(io.BytesIO(data))
    extension = KEPT_IMAGE_FORMATS.get(opened.format or "")
    rgb = to_rgb(opened)  # the trainer's rule; decodes the whole file, so a truncated one fails here
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
    refused_files: int = 0  # image paths outside the input, not regular files or over MAX_IMAGE_BYTES
    bad_captions: int = 0  # input texts over MAX_CAPTION_CHARS or not UTF-8 (lone surrogates)
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

    def __init__(self, output_dir: Path, index: int, output_format: str, settings: dict | None = None):
        self.output_dir, self.index, self.format = Path(output_dir), index, output_format
        self.settings = settings or {}
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
        """Append one row (the `docs/data.md` fields) and its image."""
        key = f"{self.name}_{self.count:06d}"
        self.count += 1
        if self.format == "webdataset":
            _add_to_tar(self.archive, f"{key}.{extension}", image_bytes)
            _add_to_tar(self.archive, f"{key}.json", json.dumps(record).encode())
        else:
            (self.partial / f"{key}.{extension}").write_bytes(image_bytes)
            self.rows.append({"file_name": f"images/{self.name}/{key}.{extension}", **record})

    def commit(self, stats: VeslStats) -> None:
        """Stats and settings first, then the shard's data; the data file's presence marks the shard finished."""
        # The settings travel with the shard, so a rerun under other options cannot take it for its own even when
        # vesl_config.json is gone (`shard_is_done`).
        record = {"settings": self.settings, "stats": asdict(stats)}
        write_atomically(self.output_dir / "stats" / f"{self.name}.json", json.dumps(record))
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


def read_shard_record(output_dir: Path, name: str) -> dict:
    """A committed shard's `{"settings", "stats"}` record (`stats/<name>.json`); a clear error when unreadable."""
    path = Path(output_dir) / "stats" / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: shard record is not valid JSON ({error}); delete it to redo shard {name}") from None
    if not (
        isinstance(record, dict) and isinstance(record.get("settings"), dict) and isinstance(record.get("stats"), dict)
    ):
        raise ValueError(
            f"{path}: shard {name} does not record the settings it was made with (an older VESL version or a "
            "hand-edited file), so it cannot be reused safely; use a new output folder"
        )
    return record


def _check_shard_settings(output_dir: Path, name: str, record: dict, settings: dict) -> None:
    made_with = record["settings"]
    changed = sorted(k for k in set(made_with) | set(settings) if made_with.get(k) != settings.get(k))
    if changed:
        raise ValueError(
            f"--output_dir {output_dir}: shard {name} was made with different settings (differs in {changed}); "
            "use a new output folder or the same options to resume"
        )


def shard_is_done(output_dir: Path, index: int, output_format: str, settings: dict | None = None) -> bool:
    """Whether output shard `index` was committed (its stats and data file exist). With `settings`, a committed
    shard made under other settings raises `ValueError` instead of being reused."""
    name = f"{index:05d}"
    data = Path(output_dir) / (f"{name}.tar" if output_format == "webdataset" else f"annotations/{name}.jsonl")
    if not (data.is_file() and (Path(output_dir) / "stats" / f"{name}.json").is_file()):
        return False
    if settings is not None:
        _check_shard_settings(output_dir, name, read_shard_record(output_dir, name), settings)
    return True


def check_committed_shards(output_dir: Path, output_format: str, settings: dict) -> None:
    """Every committed shard in `output_dir` (any index) was made with `settings`; `ValueError` naming the first that
    was not. Run before anything is written, so a stale folder is refused untouched."""
    for path in sorted((Path(output_dir) / "stats").glob("*.json")):
        if path.stem.isdigit():
            shard_is_done(output_dir, int(path.stem), output_format, settings)


def finalize_output(
    output_dir: Path, num_shards: int, output_format: str, settings: dict | None = None
) -> dict | None:
    """When every shard is done: total stats into `stats.json` (and, for imagefolder, all rows into
    `metadata.jsonl`); returns the summary, or None (with a warning) while shards are missing. With `settings`,
    a shard made under other settings raises `ValueError`."""
    missing = [i for i in range(num_shards) if not shard_is_done(output_dir, i, output_format, settings)]
    if missing:
        logger.warning(f"{len(missing)} of {num_shards} shards unfinished (first: {missing[0]}); rerun to resume")
        return None
    total = VeslStats()
    for index in range(num_shards):
        total = total.merge(VeslStats(**read_shard_record(output_dir, f"{index:05d}")["stats"]))
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
