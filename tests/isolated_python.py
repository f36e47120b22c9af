"""Run Python where this project's packages cannot be imported, as a Hub user without our package would.

A fresh virtual environment is created (no pip, seconds) whose only link to the outside is a `.pth` line naming
the current environment's site-packages, so transformers, torch and the rest import while the editable install
of this project (a `.pth` hook inside that folder, which a plain path line does not run) stays invisible. The
child runs with `-I` (no script dir, no PYTHONPATH) from a temporary folder and asserts the blocking itself.
"""

import os
import subprocess
import sysconfig
import textwrap
import venv
from pathlib import Path

PROJECT_PACKAGES = ("modeling_occlip", "modeling_cloc", "processing", "training", "examples", "tests")

_GUARD = textwrap.dedent(
    f"""
    import importlib.util
    for _name in {PROJECT_PACKAGES!r}:
        assert importlib.util.find_spec(_name) is None, f"project package {{_name}} is importable here"
    """
)


def make_clean_venv(root: Path) -> Path:
    """Create the environment under `root` and return its python executable."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    python = root / "bin" / "python"
    purelib = subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
    ).strip()
    Path(purelib, "parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_isolated(python: Path, code: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` with `python -I` in `workdir`; raises with the child's output if it fails."""
    script = workdir / "isolated_script.py"
    script.write_text(_GUARD + textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(workdir / "hf_home"),
        HF_MODULES_CACHE=str(workdir / "hf_modules"),
        TRANSFORMERS_VERBOSITY="error",
    )
    result = subprocess.run(
        [str(python), "-I", str(script)], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result
