"""Repository contracts: the README's commands and CI stay in step."""

import re
from pathlib import Path

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
