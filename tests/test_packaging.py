"""Packaging: what a wheel installs, the console scripts, and the `python -m` / `python examples/x.py` forms."""

import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from training import commands

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("modeling_occlip", "modeling_cloc", "processing", "training")
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_console_scripts_cover_every_command_and_resolve_to_callables():
    assert set(SCRIPTS) == {
        "occlip-cloc-train-clip",
        "occlip-cloc-train-occlip",
        "occlip-cloc-train-cloc",
        "occlip-cloc-vesl",
        "occlip-cloc-evaluate",
        "occlip-cloc-synthetic-benchmark",
        "occlip-cloc-make-synthetic-data",
        "occlip-cloc-convert-open-clip",
        "occlip-cloc-llava-cloc",
        "occlip-cloc-llava-occlip",
    }
    for name, target in SCRIPTS.items():
        module, _, attribute = target.partition(":")
        assert module.split(".")[0] in LIBRARY, f"{name} points outside the installed packages: {target}"
        assert callable(getattr(importlib.import_module(module), attribute)), name


@pytest.mark.parametrize("family", ["clip", "occlip", "cloc"])
def test_trainer_scripts_train_their_family_and_exit_zero(family, monkeypatch, tmp_path):
    # A console script runs `sys.exit(function())`: the metrics dict a command returns must not reach it.
    calls = []
    monkeypatch.setattr(commands, "train", lambda args, name: calls.append((args.output_dir, name)) or {"loss": 1.0})
    monkeypatch.setattr(sys, "argv", ["prog", "--output_dir", str(tmp_path), "--max_steps", "3"])
    module, _, attribute = SCRIPTS[f"occlip-cloc-train-{family}"].partition(":")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(getattr(importlib.import_module(module), attribute)())
    assert exit_info.value.code is None
    assert calls == [(str(tmp_path), family)]
    assert getattr(commands, f"train_{family}")(["--output_dir", "x"]) == {"loss": 1.0}  # the function keeps it


def test_make_synthetic_data_script_writes_the_splits(monkeypatch, tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--num_images", "5", "--no_validation"]
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    assert commands.make_synthetic_data_script() is None
    assert f"wrote {{'train': 5, 'test_seen': 1, 'test_unseen': 1}} to {tmp_path}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held_out_pairs.json", "test_seen", "test_unseen", "train"]
    assert sum(1 for _ in (tmp_path / "train" / "metadata.jsonl").open()) == 5


def test_every_example_is_a_thin_wrapper_over_an_installed_command():
    from training import llava_cloc, llava_occlip, synthetic_benchmark

    expected = {
        "train_clip": commands.train_clip,
        "train_occlip": commands.train_occlip,
        "train_cloc": commands.train_cloc,
        "vesl_annotate": commands.vesl_annotate,
        "make_synthetic_data": commands.make_synthetic_data,
        "convert_open_clip": commands.convert_open_clip,
        "synthetic_benchmark": synthetic_benchmark.main,
        "llava_cloc": llava_cloc.main,
        "llava_occlip": llava_occlip.main,
    }
    standalone = {"__init__", "occlip_smoke"}  # a short read-me-first use of the model API, not a command
    assert sorted(p.stem for p in (ROOT / "examples").glob("*.py") if p.stem not in standalone) == sorted(expected)
    for name, command in expected.items():
        assert importlib.import_module(f"examples.{name}").main is command, name


def _project_copy(destination: Path) -> Path:
    """The files a source distribution would hold, copied so that a build leaves the worktree untouched."""
    for name in (*LIBRARY, "examples", "tests"):
        shutil.copytree(ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.mark.slow
def test_wheel_installs_only_the_library_and_its_console_scripts(tmp_path):
    pytest.importorskip("setuptools", reason="the offline build below needs setuptools (`pip install -e '.[dev]'`)")
    source = _project_copy(tmp_path / "src")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run([*command, "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("occlip_cloc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == set(LIBRARY)
    bundled = {f"processing/data/{path.name}" for path in (ROOT / "processing" / "data").iterdir()}
    assert bundled and bundled <= set(names)  # the CLIP vocabulary the processors load offline
    assert {"training/commands.py", "training/synthetic_benchmark.py", "training/llava_cloc.py"} <= set(names)
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    for name, target in SCRIPTS.items():
        assert f"{name} = {target}" in declared


# `python -m examples.x` (from the repository), `python -m training.x` (installed) and the README's script form.
MODULE_FORMS = [
    ["-m", "examples.train_clip"],
    ["-m", "examples.train_occlip"],
    ["-m", "examples.train_cloc"],
    ["-m", "examples.vesl_annotate"],
    ["-m", "examples.make_synthetic_data"],
    ["-m", "examples.convert_open_clip"],
    ["-m", "examples.synthetic_benchmark"],
    ["-m", "examples.llava_cloc"],
    ["-m", "examples.llava_occlip"],
    ["-m", "training.synthetic_benchmark"],
    ["-m", "training.evaluate"],
    ["examples/synthetic_benchmark.py"],
]


@pytest.mark.slow
@pytest.mark.parametrize("form", MODULE_FORMS, ids=lambda form: form[-1])
def test_python_dash_m_forms_print_their_options(form):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, *form, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "--output_dir" in done.stdout or "--model_dir" in done.stdout
