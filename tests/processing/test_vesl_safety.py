"""VESL against hostile or careless input (issue 14, items 2, 3, 4 and 12): image paths outside the input, devices,
FIFOs and oversized files are refused and counted; an output folder overlapping the input is refused before
anything is written; shards made under other settings are never reused; bad configs and captions are clear."""

import contextlib
import io
import json
import logging
import os
import signal
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from examples import vesl_annotate
from processing import files
from processing.files import RefusedFile, read_image_file
from processing.vesl_data import (
    LocalImage,
    list_input_shards,
    open_source_image,
    read_local_image,
)
from tests.vesl_fixtures import IMAGES, folder_files, image_bytes, write_imagefolder, write_owlv2

SECRET = image_bytes(77, 20, 20)  # a real PNG: were it read, it would be copied into the output


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return write_owlv2(tmp_path_factory.mktemp("vesl_safety_models") / "owlv2")


def run_vesl(input_path, output_dir, detector, *extra) -> dict | None:
    """A small run without captioner: threshold 0 (random models score low), 2 rows per shard, 48 px detector."""
    argv = ["--input", str(input_path), "--output_dir", str(output_dir), "--detector", str(detector)]
    argv += ["--threshold", "0", "--rows_per_shard", "2", "--batch_size", "2", "--detector_image_size", "48"]
    return vesl_annotate.main([*argv, "--disable_tqdm", "true", *extra])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (reading a FIFO blocked forever before the fix)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a read blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_rows(folder: Path, rows: list[dict]) -> None:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


# ------------------------------------------------------------------------------------------ item 2: file paths


@pytest.fixture
def hostile_folder(tmp_path):
    """An imagefolder whose rows name files outside it, a device, a FIFO and symlinks, beside two good images."""
    (tmp_path / "secret.png").write_bytes(SECRET)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good0.png").write_bytes(image_bytes(0, 48, 32))
    (folder / "good1.png").write_bytes(image_bytes(1, 32, 48))
    (folder / "inside_link.png").symlink_to(folder / "good1.png")  # a symlink that stays inside is fine
    (folder / "outside_link.png").symlink_to(tmp_path / "secret.png")
    (folder / "zero_link.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.png")
    (folder / "sub").mkdir()
    names = [
        "good0.png",
        "../secret.png",
        str(tmp_path / "secret.png"),
        "outside_link.png",
        "/dev/zero",
        "zero_link.png",
        "pipe.png",
        "sub",
        "sub/../../secret.png",
        "inside_link.png",
    ]
    write_rows(folder, [{"file_name": name, "caption": "a red square on a grey table"} for name in names])
    return folder


def test_paths_outside_the_input_devices_and_fifos_are_refused_and_counted(hostile_folder, detector, tmp_path, caplog):
    out = tmp_path / "out"
    with deadline(120), caplog.at_level(logging.WARNING, logger="processing"):
        summary = run_vesl(hostile_folder, out, detector, "--rows_per_shard", "20")
    assert summary["images"] == 2 and summary["refused_files"] == 8 and summary["unreadable_images"] == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["good0.png", "inside_link.png"]
    assert SECRET not in folder_files(out).values()  # nothing from outside the input was copied
    log = caplog.text  # the first five refusals are named with their row and path
    assert f"{hostile_folder / 'metadata.jsonl'}, line 2: image path '../secret.png' refused: it lies outside" in log
    assert "line 4: image path 'outside_link.png' refused: it is a symlink pointing outside the dataset folder" in log
    assert "line 5: image path '/dev/zero' refused" in log


@pytest.mark.parametrize(
    "name, message",
    [
        ("../secret.png", r"line 3: image path '\.\./secret\.png' refused: it lies outside the dataset folder"),
        ("outside_link.png", "it is a symlink pointing outside the dataset folder"),
        ("/dev/zero", "'/dev/zero' refused: it lies outside"),
        ("zero_link.png", "symlink pointing outside"),
        ("pipe.png", r"pipe\.png is not a regular file \(a device, FIFO or folder\)"),
        ("sub", "is not a regular file"),
        ("", "empty or contains a NUL"),
    ],
)
def test_read_image_file_refuses(hostile_folder, name, message):
    with deadline(20), pytest.raises(RefusedFile, match=message):
        read_image_file(name, hostile_folder, f"{hostile_folder}/metadata.jsonl, line 3")


def test_read_image_file_size_cap_and_missing_file(hostile_folder):
    assert read_image_file("good0.png", hostile_folder) == (hostile_folder / "good0.png").read_bytes()
    assert read_image_file("inside_link.png", hostile_folder) == (hostile_folder / "good1.png").read_bytes()
    size = (hostile_folder / "good0.png").stat().st_size
    with pytest.raises(RefusedFile, match=rf"good0\.png has {size:,} bytes, over the 100 cap"):
        read_image_file("good0.png", hostile_folder, max_bytes=100)
    with pytest.raises(FileNotFoundError):  # missing: an unreadable image, counted as before
        read_image_file("missing.png", hostile_folder)
    with pytest.raises(RefusedFile, match="no local folder"):
        read_local_image(LocalImage(None, "good0.png", "row"))


def test_oversized_files_and_tar_members_are_refused(hostile_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "MAX_IMAGE_BYTES", 100)
    (row,) = [r for r in list_input_shards(str(hostile_folder), rows_per_shard=20)[0].rows() if r.key == "good0.png"]
    with pytest.raises(RefusedFile, match="over the 100 cap"):
        open_source_image(row.image)
    with tarfile.open(tmp_path / "big.tar", "w") as archive:
        for name, data in (("a.png", SECRET), ("a.json", json.dumps({"caption": "a red square"}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    (row,) = list(list_input_shards(str(tmp_path / "big.tar"))[0].rows())
    assert row.text == "a red square"
    with pytest.raises(RefusedFile, match=r"big\.tar: sample 'a': member 'a\.png' has .* bytes, over the cap"):
        open_source_image(row.image)


def test_dataset_rows_naming_files_outside_the_input_are_refused(tmp_path, detector):
    """A `save_to_disk` dataset whose image column holds file paths: only files inside its folder are read."""
    from datasets import Dataset

    (tmp_path / "secret.png").write_bytes(SECRET)
    rows = {
        "image": ["inside.png", str(tmp_path / "secret.png"), "../secret.png"],
        "caption": ["a red square on a grey table", "a secret", "a secret"],
    }
    Dataset.from_dict(rows).save_to_disk(str(tmp_path / "data"))
    (tmp_path / "data" / "inside.png").write_bytes(image_bytes(0, 48, 32))
    summary = run_vesl(tmp_path / "data", tmp_path / "out", detector, "--rows_per_shard", "3")
    assert summary["images"] == 1 and summary["refused_files"] == 2
    assert SECRET not in folder_files(tmp_path / "out").values()


# -------------------------------------------------------------------------------- item 3: output apart from input


@pytest.mark.parametrize("where", ["same", "inside", "contains", "tar_inside", "glob"])
def test_output_overlapping_the_input_is_refused_before_writing(tmp_path, detector, where):
    data = write_imagefolder(tmp_path / "data", bad_image=False)
    (data / "shards").mkdir()
    (data / "shards" / "input-000.tar").write_bytes(b"")
    source, output = {
        "same": (data, data),
        "inside": (data, data / "vesl"),
        "contains": (data, tmp_path),
        "tar_inside": (data / "shards" / "input-000.tar", data / "shards"),
        "glob": (f"{data}/shards/*.tar", data),
    }[where]
    before = folder_files(tmp_path)
    with pytest.raises(ValueError, match=r"--output_dir .* (is|contains|lies inside) the input .*outside the input"):
        run_vesl(source, output, detector)
    assert folder_files(tmp_path) == before  # metadata.jsonl untouched, nothing written
    assert where != "inside" or not (data / "vesl").exists()


def test_output_reached_through_a_symlink_is_still_the_input(tmp_path, detector):
    data = write_imagefolder(tmp_path / "data", bad_image=False)
    (tmp_path / "alias").symlink_to(data)
    with pytest.raises(ValueError, match="is the input"):
        run_vesl(data, tmp_path / "alias", detector)


# ------------------------------------------------------------------------------------- item 4: stale shards


@pytest.fixture
def finished_run(tmp_path, detector):
    data = write_imagefolder(tmp_path / "data", bad_image=False)
    out = tmp_path / "out"
    run_vesl(data, out, detector)
    return data, out


def test_shards_from_other_settings_are_refused_without_the_config_file(finished_run, detector):
    data, out = finished_run
    (out / "vesl_config.json").unlink()
    (out / "annotations" / "00002.jsonl").unlink()  # one shard to redo: the others must not be reused blindly
    before = folder_files(out)
    with pytest.raises(
        ValueError, match=r"shard 00000 was made with different settings \(differs in \['threshold'\]\)"
    ):
        run_vesl(data, out, detector, "--threshold", "0.05")
    assert folder_files(out) == before  # refused before writing anything
    summary = run_vesl(data, out, detector)  # the same options resume
    assert summary["images"] == len(IMAGES)
    assert json.loads((out / "stats" / "00000.json").read_text())["settings"]["threshold"] == 0.0


def test_shard_records_without_settings_or_corrupt_are_refused(finished_run, detector):
    data, out = finished_run
    record = json.loads((out / "stats" / "00001.json").read_text())
    (out / "stats" / "00001.json").write_text(json.dumps(record["stats"]))  # as an older version wrote it
    with pytest.raises(ValueError, match=r"00001\.json: shard 00001 does not record the settings it was made with"):
        run_vesl(data, out, detector)
    (out / "stats" / "00001.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"00001\.json: shard record is not valid JSON"):
        run_vesl(data, out, detector)


def test_corrupt_config_file_is_a_clear_error(finished_run, detector):
    data, out = finished_run
    (out / "vesl_config.json").write_text('{"threshold": 0.1,')
    with pytest.raises(ValueError, match=r"vesl_config\.json is not valid JSON \(.*\); it records the run's settings"):
        run_vesl(data, out, detector)
    (out / "vesl_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"vesl_config\.json must hold a JSON object of settings, got list"):
        run_vesl(data, out, detector)


# ------------------------------------------------------------------------------------ item 12: bad captions


def test_long_and_surrogate_captions_are_counted_not_fatal(tmp_path, detector, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(image_bytes(index, 40, 30))
    captions = ["a red square on a grey table", "a dog " * 200_000, "a cat \udc80 on a mat"]
    # json.dumps escapes the lone surrogate ("\udc80"), which json.loads turns back into one, as a real file would
    write_rows(folder, [{"file_name": f"{i}.png", "caption": c} for i, c in enumerate(captions)])
    with caplog.at_level(logging.WARNING, logger="processing"):
        summary = run_vesl(folder, tmp_path / "out", detector, "--rows_per_shard", "3")
    assert summary["images"] == 1 and summary["bad_captions"] == 2
    assert "1.png: caption 'a dog a dog" in caplog.text and "characters, more than the 10,000" in caplog.text
    assert "2.png: caption 'a cat \\udc80 on a mat' is not valid Unicode" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["0.png"] and Image.open(tmp_path / "out" / rows[0]["file_name"])
