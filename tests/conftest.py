"""Test-session guards: offline, no torchvision, and a shared clean virtual environment for remote-code tests."""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

if importlib.util.find_spec("torchvision") is not None:
    raise pytest.UsageError(
        "torchvision is installed: transformers imports it and PyPI's build fails next to torch 2.13.0+cpu. "
        "Uninstall it (pip uninstall -y torchvision); this project needs none."
    )


@pytest.fixture(scope="session")
def clean_python(tmp_path_factory):
    """Python of a fresh venv where this project's packages cannot be imported (see tests/isolated_python.py)."""
    from tests.isolated_python import make_clean_venv

    return make_clean_venv(tmp_path_factory.mktemp("clean_venv"))
