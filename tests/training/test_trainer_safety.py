"""Issue 14, trainer side: resume reads no pickle, checkpoints are atomic and checksummed, outputs never overwrite
inputs, image paths stay inside the dataset, bad metadata lines are bad rows, non-finite training stops, and a
run does not depend on the `datasets` cache."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from examples import train_clip, train_occlip
from processing import files
from processing.files import read_image_file
from tests.training_fixtures import write_dataset, write_model_config
from training import data as data_module
from training.checkpoint import CheckpointError, sha256_of
from training.data import MetadataError, load_image_text_dataset
from training.trainer import check_finite_loss

ROOT = Path(__file__).resolve().parents[2]
MAINS = {"clip": train_clip.main, "occlip": train_occlip.main}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), rows=8)


def run(data, out, *extra, config, family="clip"):
    argv = ["--train_data", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "4"]
    argv += [
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--learning_rate",
        "1e-3",
        "--model_config",
        str(config),
    ]
    return MAINS[family]([*argv, *extra])


def rewrite_metadata(folder: Path, rows: list) -> None:
    (folder / "metadata.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def metadata_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


class Planted:
    """Unpickling this creates the marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(Planted(marker))


# ------------------------------------------------------------------------------------------- 1. no pickle on resume


ACCELERATE_NAMES = [
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "pytorch_model.bin",
    "scaler.pt",
    "dl_state_dict.bin",
]


def test_resume_never_unpickles_a_planted_file(data, tmp_path):
    """Pickles under every name accelerate's `load_state` reads are ignored (the resume succeeds from the safe
    files); with every file of the checkpoint replaced by a pickle, the resume fails clearly; nothing runs."""
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run(data, out, "--max_steps", "2", "--checkpointing_steps", "1", config=config)
    marker = tmp_path / "executed"
    payload = planted_pickle(marker)
    checkpoint = out / "checkpoints" / "checkpoint_2"
    for name in ACCELERATE_NAMES:
        (checkpoint / name).write_bytes(payload)
    run(data, out, "--max_steps", "3", "--resume_from_checkpoint", "latest", config=config)
    assert not marker.exists()
    assert (out / "checkpoints").is_dir() and (out / "model.safetensors").is_file()

    for path in checkpoint.iterdir():
        path.write_bytes(payload)
    with pytest.raises(ValueError, match=r"checkpoint_2"):
        run(data, out, "--max_steps", "3", "--resume_from_checkpoint", str(checkpoint), config=config)
    assert not marker.exists()


def test_each_file_replaced_by_a_pickle_is_a_clear_error_and_never_runs(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run(data, out, "--max_steps", "1", "--checkpointing_steps", "1", config=config)
    checkpoint = out / "checkpoints" / "checkpoint_1"
    marker = tmp_path / "executed"
    names = sorted(p.name for p in checkpoint.iterdir())
    assert "trainer_state.json" in names and "model.safetensors.sha256" in names
    assert not any(n.endswith((".pkl", ".bin", ".pt")) for n in names)  # nothing pickled is written
    for name in names:
        original = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(planted_pickle(marker))
        with pytest.raises(ValueError, match=rf"checkpoint_1.*|{name}"):
            run(data, out, "--max_steps", "1", "--resume_from_checkpoint", str(checkpoint), config=config)
        assert not marker.exists(), name
        (checkpoint / name).write_bytes(original)


# ------------------------------------------------------------------------- 15. atomic checkpoints, refused resumes


def test_latest_passes_over_a_half_written_checkpoint(data, tmp_path, capsys):
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run(data, out, "--max_steps", "2", "--checkpointing_steps", "1", config=config)
    killed = out / "checkpoints" / "checkpoint_3"  # as a SIGKILL left it: empty optimizer, no model config
    killed.mkdir()
    (killed / "optimizer.bin").write_bytes(b"")
    (killed / "model.safetensors").write_bytes(b"\0" * 16)
    (out / "checkpoints" / ".tmp_checkpoint_3").mkdir()  # a temporary folder of a killed save
    run(
        data,
        out,
        "--max_steps",
        "3",
        "--checkpointing_steps",
        "1",
        "--resume_from_checkpoint",
        "latest",
        config=config,
    )
    assert "passing over an incomplete checkpoint" in capsys.readouterr().out
    state = json.loads((killed / "trainer_state.json").read_text())  # replaced by the complete step-3 checkpoint
    assert state["progress"]["step"] == 3 and not (killed / "optimizer.bin").exists()
    assert not (out / "checkpoints" / ".tmp_checkpoint_3").exists()


def test_resume_without_rng_state_or_with_another_batch_size_is_refused(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run(data, out, "--max_steps", "1", "--checkpointing_steps", "1", config=config)
    checkpoint = out / "checkpoints" / "checkpoint_1"
    resume = ["--max_steps", "2", "--resume_from_checkpoint", str(checkpoint)]
    with pytest.raises(ValueError, match=r"per_device_train_batch_size 4 \(now 2\)"):
        run(data, out, *resume, "--per_device_train_batch_size", "2", config=config)
    with pytest.raises(ValueError, match=r"gradient_accumulation_steps 1 \(now 2\)"):
        run(
            data,
            out,
            *resume,
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "2",
            config=config,
        )
    (checkpoint / "rng_state_0.json").unlink()
    with pytest.raises(CheckpointError, match=r"checkpoint_1 has no rng_state_0\.json"):
        run(data, out, *resume, config=config)
    with pytest.raises(ValueError, match="no checkpoint found"):  # `latest` finds no complete one
        run(data, out, "--max_steps", "2", "--resume_from_checkpoint", "latest", config=config)


def test_checksums_are_written_and_corrupted_weights_refused(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run(data, out, "--max_steps", "1", "--checkpointing_steps", "1", config=config)
    for folder in (out, out / "checkpoints" / "checkpoint_1"):
        sidecar = (folder / "model.safetensors.sha256").read_text().split()
        assert sidecar == [sha256_of(folder / "model.safetensors"), "model.safetensors"]
    weights = out / "checkpoints" / "checkpoint_1" / "model.safetensors"
    corrupted = bytearray(weights.read_bytes())
    corrupted[-3] ^= 0xFF  # a tensor byte: the file still parses, only the checksum sees it
    weights.write_bytes(bytes(corrupted))
    load_file(weights)
    with pytest.raises(CheckpointError, match=r"checkpoint_1/model\.safetensors is corrupted"):
        run(data, out, "--max_steps", "2", "--resume_from_checkpoint", "latest", config=config)


# ------------------------------------------------------------------------------- 3. outputs never overwrite inputs


def test_output_dir_overlapping_the_training_data_is_refused_before_writing(tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    data = write_dataset(tmp_path / "data", rows=4)
    before = sorted(p.name for p in data.iterdir())
    for out, relation in ((data, "is"), (data / "out", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=rf"--output_dir .* {relation} --train_data"):
            run(data, out, "--max_steps", "1", config=config)
    assert sorted(p.name for p in data.iterdir()) == before and not (tmp_path / "README.md").exists()


# -------------------------------------------------------------- 7. non-finite training, invalid numbers of steps


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--learning_rate", "inf"], "--learning_rate must be a finite number > 0, got inf"),
        (["--learning_rate", "0"], "--learning_rate must be a finite number > 0"),
        (["--learning_rate=-1e-3"], "--learning_rate must be a finite number > 0"),
        (["--backbone_learning_rate", "nan"], "--backbone_learning_rate must be a finite number > 0"),
        (["--max_steps", "0"], "--max_steps must be a positive integer, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be a positive integer"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be a positive integer"),
        (["--logging_steps", "0"], "--logging_steps must be a positive integer"),
    ],
)
def test_invalid_rates_and_step_counts_are_refused_up_front(data, tmp_path, flags, message):
    config = write_model_config(tmp_path / "config.json", "clip")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run(data, tmp_path / "out", "--max_steps", "1", *flags, config=config)
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"step \d+: .*not finite"):
        run(data, out, "--max_steps", "6", "--learning_rate", "1e9", "--checkpointing_steps", "1", config=config)
    assert not (out / "model.safetensors").exists()
    for checkpoint in (out / "checkpoints").glob("checkpoint_*"):  # those saved are the finite ones
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint.name


def test_the_finite_loss_check_names_the_step_and_every_part():
    check_finite_loss(3, torch.tensor(1.0), {"contrastive": torch.tensor(1.0)})
    with pytest.raises(FloatingPointError, match=r"step 7: .*loss nan, contrastive 1, relation inf"):
        check_finite_loss(
            7, torch.tensor(float("nan")), {"contrastive": torch.tensor(1.0), "relation": torch.tensor(float("inf"))}
        )


# ------------------------------------------------------------------------------ 2. image paths in the trainer


def with_alarm(seconds: int):
    """Fail instead of hanging forever (a FIFO once blocked the reader)."""

    def timeout(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)


def test_image_paths_outside_the_folder_fifos_and_huge_files_are_bad_rows(tmp_path, monkeypatch):
    config = write_model_config(tmp_path / "config.json", "clip")
    data = write_dataset(tmp_path / "data", rows=8)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", data / "link.png")
    os.symlink(data / "000.png", data / "inner_link.png")  # a link inside the folder is fine
    os.mkfifo(data / "pipe.png")
    (data / "big.png").write_bytes((data / "000.png").read_bytes() + b"\0" * 4096)
    rows = metadata_rows(data)
    rows += [{**rows[0], "file_name": name} for name in ("link.png", "pipe.png", "big.png", "inner_link.png")]
    rewrite_metadata(data, rows)
    monkeypatch.setattr(files, "MAX_IMAGE_BYTES", 4000)
    assert os.path.getsize(data / "000.png") < 4000 < os.path.getsize(data / "big.png")
    with_alarm(120)
    try:
        skip = ["--max_steps", "1", "--per_device_train_batch_size", "12", "--on_bad_sample", "skip"]
        metrics = run(data, tmp_path / "out", *skip, config=config)
        assert metrics["skipped_rows"] == 3
        with pytest.raises(ValueError, match=r"row 8 \(link\.png\): unreadable image .*outside the dataset folder"):
            run(data, tmp_path / "out2", "--max_steps", "1", "--per_device_train_batch_size", "12", config=config)
        with pytest.raises(ValueError, match=r"pipe\.png is not a regular file"):
            read_image_file(data / "pipe.png", data)
        with pytest.raises(ValueError, match=r"big\.png has [\d,]+ bytes, over the 4,000 cap"):
            read_image_file(data / "big.png", data, max_bytes=4000)
    finally:
        signal.alarm(0)


# ------------------------------------------------------------------------- 5 and 14. the metadata.jsonl reader


@pytest.mark.parametrize("field", ["regions", "scene_graph", "negatives"])
def test_columns_come_from_the_schema_not_the_first_row(tmp_path, field):
    data = write_dataset(tmp_path / "data", rows=4)
    rows = metadata_rows(data)
    for row in rows:
        row["negatives"] = {"colour_replace": "a pink square"}
    del rows[0][field]
    rewrite_metadata(data, rows)
    loaded = load_image_text_dataset(str(data))
    assert loaded[0][field] is None
    assert loaded[1][field] == (
        {**{k: None for k in data_module.NEGATIVES_FEATURE}, **rows[1][field]}
        if field == "negatives"
        else rows[1][field]
    )


def test_bad_metadata_lines_are_named_or_counted(tmp_path):
    config = write_model_config(tmp_path / "config.json", "cloc")
    data = write_dataset(tmp_path / "data", rows=8)
    rows = metadata_rows(data)
    bad = {
        2: {**rows[1], "regions": [{"bbox": "abc", "text": "x"}]},
        4: {**rows[3], "regions": [{"bbox": [1, 2, 3], "text": "x"}]},
        6: "{not json",
    }
    lines = [bad.get(number, row) for number, row in enumerate(rows, start=1)]
    rewrite_metadata(data, lines)
    with pytest.raises(MetadataError, match=r"metadata\.jsonl, line 2: region 0: bbox 'abc' is not 4 numbers"):
        load_image_text_dataset(str(data))
    rewrite_metadata(data, [lines[0], lines[3]])
    with pytest.raises(MetadataError, match=r"line 2: region 0: bbox \[1, 2, 3\] is not 4 numbers"):
        load_image_text_dataset(str(data))
    rewrite_metadata(data, [lines[0], lines[5]])
    with pytest.raises(MetadataError, match=r"line 2: Expecting property name"):
        load_image_text_dataset(str(data))
    rewrite_metadata(data, lines + [rows[0], rows[2], rows[4]])  # 8 good rows, 3 bad lines
    metrics = train_cloc_main(data, tmp_path / "out", config)
    assert metrics["skipped_rows"] == 3


def train_cloc_main(data, out, config):
    from examples import train_cloc

    argv = ["--train_data", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "4"]
    argv += ["--max_steps", "2", "--disable_tqdm", "true", "--model_config", str(config), "--on_bad_sample", "skip"]
    return train_cloc.main(argv)


# ------------------------------------------------------------------------------------ 16. no datasets-cache effect


@pytest.mark.slow
def test_a_cold_datasets_cache_and_a_warm_one_train_the_same_weights(data, tmp_path):
    """Two runs in fresh processes share one fresh HF_HOME: the first builds any cache, the second finds it warm."""
    config = write_model_config(tmp_path / "config.json", "occlip")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    weights = []
    for attempt in range(2):
        out = tmp_path / f"out{attempt}"
        command = [sys.executable, "examples/train_occlip.py", "--train_data", str(data), "--output_dir", str(out)]
        command += ["--model_config", str(config), "--max_steps", "3", "--per_device_train_batch_size", "4"]
        command += ["--disable_tqdm", "true"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append(load_file(out / "model.safetensors"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_pickled_checkpoint_of_an_older_trainer_is_refused_by_name(tmp_path):
    from training.checkpoint import incomplete_reason, read_training_state

    folder = tmp_path / "checkpoint_4"
    folder.mkdir()
    for name in ("model.safetensors", "model_config.json", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (folder / name).write_bytes(planted_pickle(tmp_path / "executed"))
    assert "pickled state" in incomplete_reason(folder)
    with pytest.raises(CheckpointError, match=r"checkpoint_4 holds pickled state .* never read"):
        read_training_state(folder)
    assert not (tmp_path / "executed").exists()


def test_a_lone_surrogate_in_metadata_is_a_bad_line(tmp_path):
    data = write_dataset(tmp_path / "data", rows=2)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"a ', '"\\ud800 ', 1)
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=r"line 2: a string is not valid Unicode \(surrogates not allowed"):
        load_image_text_dataset(str(data))
    assert len(load_image_text_dataset(str(data), on_bad_sample="skip")) == 1
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join([lines[0], "{bad"]).encode())
    with pytest.raises(MetadataError, match=r"line 2: Expecting property name"):  # line 1 (with a BOM) is fine
        load_image_text_dataset(str(data))


def test_output_dir_equal_to_the_clip_folder_or_the_eval_data_is_refused(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from tests.factories import clip_vocab_text_config, tiny_vision_config

    data = write_dataset(tmp_path / "data", rows=4)
    clip = tmp_path / "clip"
    CLIPModel(
        CLIPConfig(text_config=clip_vocab_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    ).save_pretrained(clip)
    before = sorted(p.name for p in clip.iterdir())
    with pytest.raises(ValueError, match=r"--output_dir .* is --init_from"):
        train_clip.main(["--train_data", str(data), "--output_dir", str(clip), "--init_from", str(clip)])
    assert sorted(p.name for p in clip.iterdir()) == before
    evaluation = write_dataset(tmp_path / "eval", rows=2)
    with pytest.raises(ValueError, match=r"--output_dir .* is inside --eval_data"):
        train_clip.main(
            ["--train_data", str(data), "--output_dir", str(evaluation / "o"), "--eval_data", str(evaluation)]
        )
