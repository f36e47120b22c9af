"""Repository contracts: the README's commands and CI stay in step; the test layout and its `slow` marker."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README must start with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_first_block_has_main_and_test_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "pip install torch==2.13.0" in commands[0] and "pytest" in commands[1]
    assert commands[0].index("torch==2.13.0") < commands[0].index("pip install -e")


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [readme_commands()[1]]


def test_layout_packages_exist():
    for name in ("modeling_occlip", "modeling_cloc", "processing", "training", "examples", "tests"):
        assert (ROOT / name / "__init__.py").is_file(), name


def test_every_test_file_named_in_the_readme_docs_and_ci_exists():
    texts = [ROOT / "README.md", ROOT / ".ci" / "run", *sorted((ROOT / "docs").glob("*.md"))]
    named = {(path.name, m) for path in texts for m in re.findall(r"tests/(?:\w+/)*\w+\.py", path.read_text())}
    assert named, "the README and docs name test files"
    assert [(where, test) for where, test in sorted(named) if not (ROOT / test).is_file()] == []


def test_tests_are_grouped_by_area_with_helpers_at_the_top():
    tests = ROOT / "tests"
    for area in ("models", "processing", "training"):
        assert (tests / area / "__init__.py").is_file(), area
        assert len(list((tests / area).glob("test_*.py"))) >= 10, area
    top_level = sorted(p.name for p in tests.glob("test_*.py"))
    # Repository-wide contracts stay at the top: docs, packaging, layout, and the scan for code run from data.
    assert top_level == ["test_docs.py", "test_no_code_runs_from_data.py", "test_packaging.py", "test_repository.py"]
    for helper in ("conftest.py", "factories.py", "training_fixtures.py", "isolated_python.py", "vesl_fixtures.py"):
        assert (tests / helper).is_file(), helper


# What makes a test slow: a clean virtual environment, another Python process, or several processes.
SLOW_SIGNS = ("clean_python", "run_isolated", "sys.executable", "spawn(", "torch.distributed.run")


def _is_marked_slow(function: ast.FunctionDef) -> bool:
    return any(ast.unparse(decorator) == "pytest.mark.slow" for decorator in function.decorator_list)


def test_tests_that_start_processes_or_venvs_are_marked_slow():
    unmarked = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                code = ast.get_source_segment(source, node)
                if any(sign in code for sign in SLOW_SIGNS) and not _is_marked_slow(node):
                    unmarked.append(f"{path.relative_to(ROOT)}::{node.name}")
    assert unmarked == []


def test_the_slow_marker_is_registered_and_not_deselected_by_default():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(marker.startswith("slow:") for marker in options["markers"])
    assert "--strict-markers" in options["addopts"] and "not slow" not in options["addopts"]
    assert readme_commands()[1].endswith("python -m pytest -q")
