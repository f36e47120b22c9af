"""Reading image files named by data rows, safely: the one rule for the trainer's reader and VESL.

A path read from data must resolve (symlinks included) inside its dataset folder, name a regular file (a FIFO
would block, a device such as /dev/zero never ends) and hold at most `MAX_IMAGE_BYTES`; otherwise `RefusedFile`
names the row and the path, and the caller counts or reports the row as bad.
"""

import os
import stat
from pathlib import Path

# Far above any photo (a 100-megapixel PNG is ~300 MB only when uncompressed noise); a row naming a larger file is
# refused before reading, so one bad row cannot exhaust memory.
MAX_IMAGE_BYTES = 256 * 2**20


class RefusedFile(ValueError):
    """An image file that is not read: outside its dataset folder, not a regular file, or over the size cap."""


def read_image_file(
    path: str | os.PathLike, root: Path | None, where: str = "row", max_bytes: int | None = None
) -> bytes:
    """The bytes of the image file `path` (relative paths are taken inside `root`), or `RefusedFile`.

    With `root`, the resolved path must lie inside the resolved `root`, so "../x.png", an absolute path elsewhere
    or a symlink pointing out is refused; without it only the file checks apply. The file must be a regular file
    of at most `max_bytes` (default `MAX_IMAGE_BYTES`); a FIFO is refused without blocking. A missing file raises
    `FileNotFoundError`. `where` ("metadata.jsonl, line 4") starts every message.
    """
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    name = os.fspath(path)
    if not name or "\0" in name:
        raise RefusedFile(f"{where}: image path {name!r} refused: empty or contains a NUL character")
    if root is None:
        resolved = Path(name).resolve()
    else:
        root = Path(root).resolve()
        resolved = (root / name).resolve()
        if not resolved.is_relative_to(root):
            lexical = Path(os.path.normpath(root / name))  # ".." collapsed, symlinks not followed
            why = "is a symlink pointing" if lexical.is_relative_to(root) else "lies"
            raise RefusedFile(
                f"{where}: image path {name!r} refused: it {why} outside the dataset folder {root} ({resolved})"
            )
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path has no symlink left, so
    # one appearing now is refused rather than followed out of the folder.
    descriptor = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(descriptor)  # of what was opened, not of the name, which could have been swapped since
        if not stat.S_ISREG(info.st_mode):
            raise RefusedFile(
                f"{where}: image path {name!r} refused: {resolved} is not a regular file (a device, FIFO or folder)"
            )
        if info.st_size > max_bytes:
            raise RefusedFile(
                f"{where}: image path {name!r} refused: {resolved} has {info.st_size:,} bytes, over the "
                f"{max_bytes:,} cap"
            )
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)  # the file may have grown since fstat
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise RefusedFile(f"{where}: image path {name!r} refused: {resolved} has more than {max_bytes:,} bytes")
    return data


def folder_overlap(output: Path, source: Path) -> str | None:
    """How a resolved `output` folder relates to a resolved input `source`: `"is"`, `"inside"` (output lies inside
    the input), `"contains"` (output contains the input), or None when they are apart. Writers refuse any overlap
    before writing, so outputs never overwrite or mix into their inputs."""
    if output == source:
        return "is"
    if output.is_relative_to(source):
        return "inside"
    if source.is_relative_to(output):
        return "contains"
    return None
