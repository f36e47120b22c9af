"""VESL's `--on_bad_sample` (issue 14, item 2: a bad row is "counted, or an error naming row and path"): skip mode
counts refused paths, unreadable images and bad captions as before; error mode stops at the first one with its row
and path named, commits no shard, and leaves the settings a resume must match unchanged."""

import json
import os

import pytest

from examples import vesl_annotate
from processing.vesl import VeslArguments
from tests.vesl_fixtures import folder_files, image_bytes, write_owlv2


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return write_owlv2(tmp_path_factory.mktemp("vesl_bad_row_models") / "owlv2")


def run_vesl(input_path, output_dir, detector, *extra) -> dict | None:
    argv = ["--input", str(input_path), "--output_dir", str(output_dir), "--detector", str(detector)]
    argv += ["--threshold", "0", "--rows_per_shard", "10", "--batch_size", "2", "--detector_image_size", "48"]
    return vesl_annotate.main([*argv, "--disable_tqdm", "true", *extra])


def imagefolder(tmp_path, bad_name: str | None, caption: str = "a red square on a grey table"):
    """Two good rows around one bad row (`bad_name`, or a bad caption when None) at metadata.jsonl line 2."""
    (tmp_path / "secret.png").write_bytes(image_bytes(77, 20, 20))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "good0.png").write_bytes(image_bytes(0, 48, 32))
    (folder / "good1.png").write_bytes(image_bytes(1, 32, 48))
    (folder / "broken.png").write_bytes(b"not a png")
    os.mkfifo(folder / "pipe.png")
    rows = [
        {"file_name": "good0.png", "caption": "a red square on a grey table"},
        {"file_name": bad_name or "good1.png", "caption": caption},
        {"file_name": "good1.png", "caption": "a green circle next to a blue box"},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.mark.parametrize(
    "bad_name, caption, counter, message",
    [
        ("../secret.png", None, "refused_files", r"line 2: image path '\.\./secret\.png' refused: it lies outside"),
        ("pipe.png", None, "refused_files", r"line 2: image path 'pipe\.png' refused: .*not a regular file"),
        ("broken.png", None, "unreadable_images", r"broken\.png: unreadable image"),
        (None, "a dog " * 3000, "bad_captions", r"good1\.png: caption 'a dog a dog.* more than the 10,000"),
    ],
)
def test_error_mode_names_the_first_bad_row_and_writes_no_shard(
    tmp_path, detector, bad_name, caption, counter, message
):
    folder = imagefolder(tmp_path, bad_name, **({"caption": caption} if caption else {}))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"shard 0 \(.*\), .*{message}.*\(--on_bad_sample error\)"):
        run_vesl(folder, out, detector, "--on_bad_sample", "error")
    assert not out.exists() or not [p for p in folder_files(out) if "annotations" in p or "metadata" in p]

    summary = run_vesl(folder, tmp_path / "skipped", detector)  # default: skip, count and go on
    assert summary["images"] == 2 and summary[counter] == 1
    rows = [json.loads(line) for line in (tmp_path / "skipped" / "metadata.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["good0.png", "good1.png"]


def test_error_mode_on_clean_data_gives_the_skip_mode_output_and_resumes_it(tmp_path, detector):
    folder = imagefolder(tmp_path, None)
    first = run_vesl(folder, tmp_path / "a", detector, "--on_bad_sample", "error")
    second = run_vesl(folder, tmp_path / "b", detector)
    assert first["images"] == second["images"] == 3
    assert folder_files(tmp_path / "a") == folder_files(tmp_path / "b")  # the mode is not an output setting
    assert "on_bad_sample" not in json.loads((tmp_path / "a" / "vesl_config.json").read_text())


def test_unknown_mode_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"--on_bad_sample must be 'error' or 'skip', got 'ignore'"):
        VeslArguments(input=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), on_bad_sample="ignore")
