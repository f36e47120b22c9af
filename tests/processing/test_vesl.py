"""VESL pseudo-labelling: phrase extraction, box selection and geometry on hand-made values; end to end with tiny
random OWLv2 and GIT models (output loads and trains CLOC, exact resume, two processes, unreadable images)."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from examples import vesl_annotate
from processing import VeslArguments, alt_text_ngrams, annotate, extract_region_phrases
from processing.vesl import (
    ImageCaptioner,
    OwlV2RegionDetector,
    above_threshold,
    assign_phrases,
    nms,
    padded_square_boxes_to_pixels,
    select_regions,
)
from tests.training_fixtures import write_model_config
from tests.vesl_fixtures import (
    BAD_IMAGE,
    IMAGES,
    folder_files,
    write_datasets_input,
    write_git_captioner,
    write_imagefolder,
    write_owlv2,
    write_tars,
)
from training.cli import parse_args
from training.data import load_image_text_dataset
from training.trainer import ContrastiveTrainingArguments, train

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize(
    "caption, phrases",
    [
        ("A photo of a red car parked next to the old brick house", ["red car", "old brick house"]),
        (
            "Stock photo: a man in a t-shirt holding two small dogs on the beach, wallpaper HD",
            ["man", "t-shirt", "small dogs", "beach"],
        ),
        ("The front of the building", ["building"]),  # "front" is a stop word
        ("A dog and a cat. The dog sleeps on a red sofa.", ["dog", "cat", "red sofa"]),  # de-duplicated
        ("This is it", []),
        ("", []),
    ],
)
def test_extract_region_phrases(caption, phrases):
    assert extract_region_phrases(caption) == phrases


def test_extract_region_phrases_cap_and_errors():
    caption = "a cat, a dog, a bird, a horse and a cow"
    assert extract_region_phrases(caption, max_phrases=3) == ["cat", "dog", "bird"]
    with pytest.raises(TypeError, match="caption 0 must be a string"):
        extract_region_phrases(None)
    with pytest.raises(ValueError, match="max_phrases must be a positive integer"):
        extract_region_phrases(caption, max_phrases=0)


def test_alt_text_ngrams():
    text = "Red car, blue house - stock photo of the city"
    assert alt_text_ngrams(text, max_n=2) == [
        "red",
        "car",
        "blue",
        "house",
        "city",
        "red car",
        "blue house",
        "the city",
    ]
    # n-grams never cross punctuation; web words ("stock", "photo") and stop-word-only windows ("of the") are gone
    assert alt_text_ngrams(text, max_n=3)[-1] == "of the city"
    assert alt_text_ngrams(text, max_n=3, max_ngrams=4) == ["red", "car", "blue", "house"]
    assert alt_text_ngrams("Dog's toy: dog's TOY!") == ["dog's", "toy", "dog's toy"]
    with pytest.raises(ValueError, match="max_n must be a positive integer"):
        alt_text_ngrams(text, max_n=0)


def test_phrase_assignment_and_threshold():
    logits = torch.tensor([[0.0, 2.0, -1.0], [-3.0, -4.0, -2.5], [1.0, 1.0, 0.0]])
    scores, labels = assign_phrases(logits)
    torch.testing.assert_close(scores, torch.sigmoid(torch.tensor([2.0, -2.5, 1.0])))
    assert labels.tolist() == [1, 2, 0]  # a tie goes to the first phrase
    assert above_threshold(torch.tensor([0.05, 0.1, 0.11, 0.9]), 0.1).tolist() == [False, False, True, True]


def test_nms_on_hand_made_boxes():
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 5.0]]
    )
    scores = torch.tensor([0.5, 0.9, 0.3, 0.8])
    # box 1 (0.9) suppresses box 0 (IoU 81/119 = 0.68); box 3 overlaps box 1 by 36/114 = 0.32 and stays
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert nms(boxes, scores, 1.0).tolist() == [1, 3, 0, 2]  # IoU never exceeds 1: no suppression


def test_padded_square_boxes_to_pixels():
    # landscape 200 x 100: padded to a 200 x 200 square at the bottom, so y scales by 200 as well
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.2, 0.1]])
    expected = [[50.0, 0.0, 150.0, 100.0], [80.0, 60.0, 120.0, 100.0], [170.0, 10.0, 200.0, 30.0]]
    torch.testing.assert_close(padded_square_boxes_to_pixels(boxes, 200, 100), torch.tensor(expected))
    # portrait 100 x 200: padding on the right
    portrait = padded_square_boxes_to_pixels(torch.tensor([[0.25, 0.5, 0.5, 1.0], [0.75, 0.5, 0.2, 0.2]]), 100, 200)
    torch.testing.assert_close(portrait, torch.tensor([[0.0, 0.0, 100.0, 200.0], [100.0, 80.0, 100.0, 120.0]]))


def test_select_regions():
    phrases = ["red car", "house"]
    # 4 boxes x 3 queries; the third query is batch padding and must never win
    logits = torch.tensor([[2.0, -1.0, 9.0], [-1.0, 1.0, 9.0], [1.5, -3.0, 9.0], [-5.0, -4.0, 9.0]])
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 50.5, 60.0]]
    )
    regions = select_regions(logits, boxes, phrases, threshold=0.1, nms_iou=0.5, max_regions=32)
    assert regions == [
        {"bbox": [0.0, 0.0, 10.0, 10.0], "text": "red car", "score": 0.8808},
        {"bbox": [20.0, 20.0, 40.0, 40.0], "text": "house", "score": 0.7311},
    ]  # box 2 is suppressed by box 0, box 3 is under the threshold (and half a pixel wide)
    no_nms = select_regions(logits, boxes, phrases, threshold=0.1, nms_iou=None, max_regions=2)
    assert [r["score"] for r in no_nms] == [0.8808, 0.8176]
    assert select_regions(logits, boxes, [], threshold=0.0) == []


# --------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vesl_models")
    return {"detector": write_owlv2(root / "owlv2"), "captioner": write_git_captioner(root / "git")}


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("vesl_input") / "data")


def cli_args(input_path, output_dir, models, *extra, captioner=True) -> list[str]:
    """Flags of a small run: threshold 0 (random models score low), 2 rows per shard, 48 px detector input."""
    argv = ["--input", str(input_path), "--output_dir", str(output_dir), "--detector", str(models["detector"])]
    if captioner:
        argv += ["--captioner", str(models["captioner"]), "--caption_max_new_tokens", "6"]
    argv += ["--threshold", "0", "--rows_per_shard", "2", "--batch_size", "2", "--detector_image_size", "48"]
    return [*argv, "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def straight(models, imagefolder, tmp_path_factory):
    """An uninterrupted run through the CLI: re-captioned, alt-text n-grams, imagefolder output."""
    out = tmp_path_factory.mktemp("vesl_straight") / "out"
    summary = vesl_annotate.main(cli_args(imagefolder, out, models, "--phrase_source", "alt_text_ngrams"))
    return out, summary


def test_run_writes_trainer_format_and_stats(straight, imagefolder, capsys):
    out, summary = straight
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [f"{i:03d}.png" for i in range(len(IMAGES))]  # broken.png skipped
    assert summary["images"] == len(IMAGES) and summary["unreadable_images"] == 1 and summary["shards"] == 4
    assert json.loads((out / "stats.json").read_text()) == summary
    assert summary["regions"] == sum(len(r["regions"]) for r in rows) > 0
    assert summary["regions_per_image"] == round(summary["regions"] / len(IMAGES), 4)
    assert 0 < summary["phrase_hit_rate"] <= 1
    for row, (width, height, alt_text) in zip(rows, IMAGES):
        assert row["alt_text"] == alt_text and row["caption"]  # the re-caption (or the alt-text if it came out empty)
        assert (row["width"], row["height"]) == (width, height)
        assert Image.open(out / row["file_name"]).size == (width, height)
        assert 0 < len(row["regions"]) <= 32
        scores = [r["score"] for r in row["regions"]]
        assert scores == sorted(scores, reverse=True)
        for region in row["regions"]:
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, region
            assert region["text"] in alt_text_ngrams(alt_text)

    dataset = load_image_text_dataset(str(out))
    assert len(dataset) == len(IMAGES) and dataset[0]["regions"][0]["text"] == rows[0]["regions"][0]["text"]


def test_output_trains_one_cloc_step(straight, tmp_path):
    out, _ = straight
    config = write_model_config(tmp_path / "config.json", "cloc")
    args = ContrastiveTrainingArguments(
        train_data=str(out),
        output_dir=str(tmp_path / "model"),
        model_config=str(config),
        max_steps=1,
        per_device_train_batch_size=3,
        disable_tqdm=True,
    )
    metrics = train(args, "cloc")
    assert metrics["skipped_rows"] == 0 and torch.isfinite(torch.tensor(metrics["loss"]))


def test_resume_after_interruption_is_identical(straight, models, imagefolder, tmp_path):
    out, _ = straight
    resumed = tmp_path / "out"
    argv = cli_args(imagefolder, resumed, models, "--phrase_source", "alt_text_ngrams")
    (args,) = parse_args(VeslArguments, args=argv)
    assert annotate(args, max_shards=2) is None  # stopped after 2 of 4 shards: nothing final yet
    assert not (resumed / "metadata.jsonl").exists() and not (resumed / "stats.json").exists()
    # a kill in the middle of shard 2 leaves only temporary names behind
    (resumed / "images" / "00002.tmp-99999").mkdir()
    (resumed / "images" / "00002.tmp-99999" / "00002_000000.png").write_bytes(b"half")
    summary = vesl_annotate.main(argv)
    assert summary == straight[1]
    assert folder_files(resumed) == folder_files(out)
    # an output shard lost after the fact is redone alone
    (resumed / "annotations" / "00001.jsonl").unlink()
    shutil.rmtree(resumed / "images" / "00001")
    vesl_annotate.main(argv)
    assert folder_files(resumed) == folder_files(out)


def test_webdataset_input_and_output_load_for_training(models, tmp_path):
    tars = write_tars(tmp_path / "tars", per_tar=2)
    out = tmp_path / "out"
    argv = cli_args(tars, out, models, "--output_format", "webdataset", captioner=False)
    summary = vesl_annotate.main(argv)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert summary["images"] == len(IMAGES) and summary["phrase_hit_rate"] > 0
    assert summary["unreadable_images"] == 1  # the truncated PNG
    rows = list(load_image_text_dataset(str(out)))
    assert [r["caption"] for r in rows] == [caption for _, _, caption in IMAGES]  # no captioner: input captions
    for row in rows:
        assert row["alt_text"] == row["caption"] and row["regions"]
        assert {r["text"] for r in row["regions"]} <= set(extract_region_phrases(row["caption"]))


@pytest.mark.parametrize("kind, shards", [("parquet", 2), ("save_to_disk", 3)])
def test_datasets_input(models, tmp_path, kind, shards):
    data = write_datasets_input(tmp_path / "data", kind)
    summary = vesl_annotate.main(cli_args(data, tmp_path / "out", models, captioner=False))
    assert summary["shards"] == shards and summary["images"] == len(IMAGES)  # Parquet: one shard per file
    rows = list(load_image_text_dataset(str(tmp_path / "out")))
    assert [r["caption"] for r in rows] == [caption for _, _, caption in IMAGES]


def test_detector_and_captioner_objects(models):
    detector = OwlV2RegionDetector.from_pretrained(str(models["detector"]), threshold=0.0, max_regions=3)
    images = [Image.new("RGB", (60, 20), "red"), Image.new("RGB", (10, 30), "blue"), Image.new("RGB", (8, 8))]
    regions = detector(images, [["red car", "house"], [], ["cat"]])
    # boxes wholly inside the padding (under the 60 x 20 image) are dropped after clipping
    assert 1 <= len(regions[0]) <= 3 and regions[1] == [] and len(regions) == 3
    for image, found in zip(images, regions):
        for region in found:
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    captioner = ImageCaptioner.from_pretrained(str(models["captioner"]), max_new_tokens=4)
    captions = captioner(images[:2])
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.slow
def test_two_processes_write_disjoint_shards_covering_the_input(models, imagefolder, straight, tmp_path):
    with socket.socket() as probe:  # a free port: the default one may be held by another run
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["examples/vesl_annotate.py", *cli_args(imagefolder, out, models, "--phrase_source", "alt_text_ngrams")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2: annotated shards [0, 2]" in result.stderr
    assert "process 1 of 2: annotated shards [1, 3]" in result.stderr
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight[0] / "metadata.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [r["source"] for r in expected]  # every readable image exactly once
    assert sorted(p.name for p in (out / "annotations").iterdir()) == [f"{i:05d}.jsonl" for i in range(4)]
    assert json.loads((out / "stats.json").read_text())["unreadable_images"] == 1


def test_bad_options_are_clear_errors(models, imagefolder, straight, tmp_path):
    with pytest.raises(ValueError, match=r"--input .*missing: no such file or folder"):
        vesl_annotate.main(cli_args(tmp_path / "missing", tmp_path / "out", models))
    with pytest.raises(ValueError, match=r"--threshold must lie in \[0, 1\], got 1.5"):
        vesl_annotate.main(cli_args(imagefolder, tmp_path / "out", models, "--threshold", "1.5"))
    with pytest.raises(ValueError, match="--phrase_source must be one of"):
        vesl_annotate.main(cli_args(imagefolder, tmp_path / "out", models, "--phrase_source", "words"))
    with pytest.raises(ValueError, match=r"different settings \(differs in \['phrase_source'\]\)"):
        vesl_annotate.main(cli_args(imagefolder, straight[0], models))  # the straight run used n-grams
    assert BAD_IMAGE in (imagefolder / "metadata.jsonl").read_text()
