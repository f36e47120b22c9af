"""Shared command-line parsing (`docs/data.md`): underscore and dash flags, `--config` YAML/JSON, flags override."""

import json
from dataclasses import dataclass, field

import pytest

from training.cli import parse_args


@dataclass
class Options:
    output_dir: str = field(metadata={"help": "required"})
    max_steps: int = 10
    learning_rate: float = 1e-4
    box: list[float] | None = None
    push_to_hub: bool = False


@dataclass
class More:
    seed: int = 0


def test_flags_with_underscores_and_dashes():
    options, more = parse_args(Options, More, args=["--output-dir", "out", "--max_steps", "3", "--seed", "7"])
    assert (options.output_dir, options.max_steps, options.learning_rate, more.seed) == ("out", 3, 1e-4, 7)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_fills_values_and_flags_override_it(tmp_path, suffix):
    values = {"output_dir": "from_file", "max-steps": 50, "box": [1.0, 2.0, 3.0, 4.0], "push_to_hub": True, "seed": 3}
    path = tmp_path / f"options{suffix}"
    path.write_text(json.dumps(values))  # JSON is also valid YAML
    options, more = parse_args(Options, More, args=["--config", str(path), "--max_steps", "5"])
    assert options.output_dir == "from_file" and options.max_steps == 5  # required field satisfied by the file
    assert options.box == [1.0, 2.0, 3.0, 4.0] and options.push_to_hub is True and more.seed == 3


def test_config_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output_dir: x\nmax_stpes: 3\n")
    with pytest.raises(ValueError, match=r"unknown options \['max_stpes'\]"):
        parse_args(Options, args=["--config", str(path)])
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_args(Options, args=["--config", str(path)])
    with pytest.raises(ValueError, match="no such file"):
        parse_args(Options, args=["--config", str(tmp_path / "missing.yaml")])
