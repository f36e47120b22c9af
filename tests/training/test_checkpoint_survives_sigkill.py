"""Issue 14, item 15, with a real SIGKILL: a training process killed while it writes a checkpoint leaves only a
hidden temporary folder; `--resume_from_checkpoint latest` takes the newest complete checkpoint and the resumed run
ends with the weights of an uninterrupted one, bit for bit."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from examples import train_clip
from tests.training_fixtures import write_dataset, write_model_config

ROOT = Path(__file__).resolve().parents[2]


def argv(data: Path, out: Path, config: Path, *extra: str) -> list[str]:
    common = ["--train_data", str(data), "--output_dir", str(out), "--model_config", str(config)]
    common += ["--per_device_train_batch_size", "4", "--max_steps", "3", "--checkpointing_steps", "1"]
    return [*common, "--learning_rate", "1e-3", "--disable_tqdm", "true", *extra]


@pytest.mark.slow
def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    data = write_dataset(tmp_path / "data", rows=8)
    config = write_model_config(tmp_path / "config.json", "clip")
    killed = tmp_path / "killed"
    # The child dies by SIGKILL in the middle of checkpoint_2: its model file is written, the optimizer file is
    # cut off after a few bytes and nothing after it is written (as a kill during a large write leaves it).
    child = textwrap.dedent(
        f"""
        import os, signal
        from training import checkpoint
        from examples import train_clip

        write = checkpoint.save_file

        def save_file(tensors, path, *args, **kwargs):
            if "checkpoint_2" in str(path):
                with open(path, "wb") as handle:
                    handle.write(b"\\x00" * 7)
                    handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return write(tensors, path, *args, **kwargs)

        checkpoint.save_file = save_file
        train_clip.main({argv(data, killed, config)!r})
        """
    )
    # The child computes step 1 of the run this process resumes: the same thread count keeps the sums bit-equal.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp_checkpoint_2", "checkpoint_1"]
    assert (checkpoints / ".tmp_checkpoint_2" / "optimizer.safetensors").stat().st_size == 7
    assert not (killed / "model.safetensors").exists()

    train_clip.main(argv(data, killed, config, "--resume_from_checkpoint", "latest"))
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    train_clip.main(argv(data, tmp_path / "straight", config))
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(killed / "model.safetensors")
    assert straight.keys() == resumed.keys()
    different = [name for name in straight if not torch.equal(straight[name], resumed[name])]
    assert not different, different
