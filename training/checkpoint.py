"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

Accelerate's `save_state`/`load_state` pickle the registered objects, the RNG states and the optimizer and read
them back with `weights_only=False`, so a planted file in a checkpoint folder runs code on resume. This module
writes and reads the same state with formats that cannot run code:

- `model.safetensors` (the training module's weights) and `optimizer.safetensors` (the optimizer's tensors), each
  with a `<file>.sha256` sidecar (`sha256sum -c` format) checked before loading;
- `optimizer.json` (the optimizer's param groups and non-tensor state), `trainer_state.json` (progress counters,
  the scheduler and grad-scaler states and the batch shape of the run), `rng_state_<process>.json` (Python, NumPy
  and torch generators of each process) and `model_config.json` (checked by the trainer).

The data sampler needs no file: its order follows from the seed and the epoch, and the position in the epoch is
in the progress counters.

A checkpoint is written into a hidden temporary folder and renamed into place once every file is written, so a
`checkpoint_<step>` folder is always complete; `latest` still skips any folder that misses a file (one written
by a killed older version, say).
"""

import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

CONFIG_FILE = "model_config.json"  # the model config, checked on resume by the trainer
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
FORMAT_VERSION = 1
# Files every complete checkpoint has (besides one `rng_state_<i>.json` per process).
REQUIRED_FILES = (CONFIG_FILE, STATE_FILE, MODEL_FILE, OPTIMIZER_FILE, OPTIMIZER_META_FILE)
WEIGHT_FILES = (MODEL_FILE, OPTIMIZER_FILE)
TEMP_PREFIX = ".tmp_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and file."""


def rng_file(process_index: int) -> str:
    """The RNG state file of one process."""
    return f"rng_state_{process_index}.json"


# ---------------------------------------------------------------------------------------------------- checksums


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksum(path: Path) -> Path:
    """Write `<path>.sha256` in `sha256sum` format (`<hex>  <name>`) and return it."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    _write_text(sidecar, f"{sha256_of(path)}  {path.name}\n")
    return sidecar


def verify_checksum(path: Path) -> None:
    """`CheckpointError` unless `path` matches its `.sha256` sidecar (safetensors has no checksum of its own,
    so flipped tensor bytes would otherwise load silently)."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        raise CheckpointError(f"{path}: no checksum file {sidecar.name}")
    words = sidecar.read_bytes().decode("ascii", errors="replace").split()
    expected = words[0] if words else ""
    actual = sha256_of(path)
    if actual != expected:
        raise CheckpointError(
            f"{path} is corrupted: its SHA-256 is {actual}, but {sidecar.name} records {expected or 'nothing'}"
        )


def write_checksums(folder: Path) -> list[Path]:
    """A `.sha256` sidecar for every `*.safetensors` file directly in `folder`."""
    return [write_checksum(p) for p in sorted(Path(folder).glob("*.safetensors"))]


# ---------------------------------------------------------------------------------------------------- file writes


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, value) -> None:
    # allow_nan=False: a non-finite number in a state file is a bug upstream, not something to persist.
    _write_text(path, json.dumps(value, indent=1, sort_keys=True, allow_nan=False))


def read_json(path: Path):
    """A JSON file's value; `CheckpointError` naming the file when it is missing or not JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {path.name}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) generator states as JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, where: str) -> None:
    """Restore `rng_state()`'s output; `CheckpointError` naming `where` when it is malformed."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(position), int(has_gauss), cached))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if torch.cuda.is_available() and state.get("cuda") is not None:
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise CheckpointError(f"{where}: malformed RNG state ({type(error).__name__}: {error})") from None


# ---------------------------------------------------------------------------------------------------- optimizer


def _to_json(value, where: str):
    """A state value as JSON (tuples become lists); `CheckpointError` for anything JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where} is {value}: refusing to save a non-finite optimizer setting")
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"{where}: cannot save a {type(value).__name__} without pickle")


def split_optimizer_state(state_dict: dict) -> tuple[dict, dict]:
    """`(tensors, meta)`: the optimizer's per-parameter tensors keyed `state.<id>.<name>` (safetensors) and
    everything else as JSON values."""
    tensors, plain = {}, {}
    for parameter_id, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{parameter_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain.setdefault(str(parameter_id), {})[name] = _to_json(value, f"optimizer state {parameter_id}")
    meta = {"param_groups": _to_json(state_dict["param_groups"], "optimizer param_groups"), "state": plain}
    return tensors, meta


def join_optimizer_state(tensors: dict, meta: dict, where: str) -> dict:
    """The inverse of `split_optimizer_state`."""
    try:
        state: dict[int, dict] = {}
        for key, tensor in tensors.items():
            prefix, parameter_id, name = key.split(".", 2)
            if prefix != "state":
                raise ValueError(f"unexpected tensor {key!r}")
            state.setdefault(int(parameter_id), {})[name] = tensor
        for parameter_id, values in meta["state"].items():
            state.setdefault(int(parameter_id), {}).update(values)
        groups = []
        for group in meta["param_groups"]:
            group = dict(group)
            if isinstance(group.get("betas"), list):  # JSON has no tuples; AdamW stores betas as one
                group["betas"] = tuple(group["betas"])
            groups.append(group)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{where}: malformed optimizer state ({error})") from None
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------------- folders


def checkpoint_folders(checkpoints: Path) -> list[Path]:
    """`checkpoint_<step>` folders under `checkpoints`, oldest first (temporary folders excluded)."""
    found = [p for p in Path(checkpoints).glob("checkpoint_*") if p.name.split("_")[-1].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def incomplete_reason(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint of this trainer, or None when it is."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / STATE_FILE).is_file() and any(folder.glob("*.pkl")):
        return (
            f"{folder} holds pickled state (an older trainer or `accelerate save_state`), which is never read: "
            "pickle runs code on load"
        )
    for name in (*REQUIRED_FILES, *(n + ".sha256" for n in WEIGHT_FILES), rng_file(0)):
        path = folder / name
        if not path.is_file() or path.stat().st_size == 0:
            return f"{folder} has no {name}" if not path.exists() else f"{folder}/{name} is empty"
    return None


def latest_complete(checkpoints: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint and the reasons the newer incomplete ones were passed over."""
    skipped = []
    for folder in reversed(checkpoint_folders(checkpoints)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, skipped
        skipped.append(reason)
    return None, skipped


# ---------------------------------------------------------------------------------------------------- save / load


def save_training_state(
    accelerator, folder: Path, module, optimizer, state: dict, model_config: dict, total_limit: int | None = None
) -> Path:
    """Write a checkpoint at `folder` atomically (every process calls this).

    `state` is the JSON-able trainer state (progress, scheduler, run shape). The files go to a temporary sibling
    folder that the main process renames to `folder` once all processes have written theirs; `total_limit` then
    keeps only the newest complete checkpoints.
    """
    folder = Path(folder)
    temp = folder.with_name(TEMP_PREFIX + folder.name)
    if accelerator.is_main_process:
        if temp.exists():  # left by a killed run
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _write_json(temp / rng_file(accelerator.process_index), rng_state())
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(module), str(temp / MODEL_FILE))
        tensors, meta = split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(temp / OPTIMIZER_FILE))
        _write_json(temp / OPTIMIZER_META_FILE, meta)
        if accelerator.scaler is not None:
            state = {**state, "scaler": _to_json(accelerator.scaler.state_dict(), "grad scaler")}
        _write_json(temp / STATE_FILE, {"format": FORMAT_VERSION, **state})
        _write_json(temp / CONFIG_FILE, model_config)
        for name in WEIGHT_FILES:
            write_checksum(temp / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_folder(temp)
        if folder.exists():  # an older (say incomplete) checkpoint of the same step: replace it
            stale = folder.with_name(TEMP_PREFIX + "stale_" + folder.name)
            shutil.rmtree(stale, ignore_errors=True)
            folder.rename(stale)
            temp.rename(folder)
            shutil.rmtree(stale)
        else:
            temp.rename(folder)
        _fsync_folder(folder.parent)
        if total_limit:
            complete = [p for p in checkpoint_folders(folder.parent) if incomplete_reason(p) is None]
            for old in complete[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def read_training_state(folder: Path) -> dict:
    """The checkpoint's `trainer_state.json` (no tensors are read); `CheckpointError` if incomplete."""
    folder = Path(folder)
    reason = incomplete_reason(folder)
    if reason is not None:
        raise CheckpointError(f"cannot resume: {reason}")
    state = read_json(folder / STATE_FILE)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / STATE_FILE}: not a trainer state of format {FORMAT_VERSION}")
    return state


def load_training_state(accelerator, folder: Path, module, optimizer) -> None:
    """Load the weights, optimizer, grad scaler and this process's RNG state of a checkpoint checked by
    `read_training_state` (checksums verified first)."""
    folder = Path(folder)
    rng_path = folder / rng_file(accelerator.process_index)
    if not rng_path.is_file():
        raise CheckpointError(
            f"cannot resume exactly: {folder} has no {rng_path.name} (the RNG state of process "
            f"{accelerator.process_index})"
        )
    for name in WEIGHT_FILES:
        verify_checksum(folder / name)
    try:
        missing, unexpected = load_model(accelerator.unwrap_model(module), str(folder / MODEL_FILE), strict=False)
        tensors = load_file(str(folder / OPTIMIZER_FILE))
    except (SafetensorError, OSError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: unreadable weights ({error})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / MODEL_FILE} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    meta = read_json(folder / OPTIMIZER_META_FILE)
    try:
        optimizer.load_state_dict(join_optimizer_state(tensors, meta, str(folder / OPTIMIZER_META_FILE)))
    except (KeyError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{folder}: the optimizer state does not fit this optimizer ({error})") from None
    state = read_json(folder / STATE_FILE)
    if accelerator.scaler is not None and state.get("scaler") is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    set_rng_state(read_json(rng_path), str(rng_path))


__all__ = [
    "CheckpointError",
    "checkpoint_folders",
    "incomplete_reason",
    "latest_complete",
    "load_training_state",
    "read_json",
    "read_training_state",
    "save_training_state",
    "sha256_of",
    "verify_checksum",
    "write_checksum",
    "write_checksums",
]
