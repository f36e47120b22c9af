"""Command-line parsing shared by every script (`docs/data.md`): `HfArgumentParser` flags plus `--config FILE`.

A YAML or JSON file given with `--config` supplies values for any field; flags on the command line override it.
"""

import argparse
import json
from pathlib import Path

import yaml
from transformers import HfArgumentParser


def load_config_file(path: str | Path) -> dict:
    """Options from a `.yaml`/`.yml`/`.json` file as a flat dict (`ValueError` naming the file otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(
            f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def parse_args(*dataclass_types, args: list[str] | None = None) -> tuple:
    """One instance per dataclass, from `--config FILE` (optional) overridden by the other flags."""
    parser = HfArgumentParser(dataclass_types)
    parser.add_argument("--config", default=None, help="YAML or JSON file of options; flags override it")
    # Read --config first, alone: the full parser would stop on required options that the file provides.
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", default=None)
    known, _ = config_only.parse_known_args(args)
    if known.config is not None:
        values = load_config_file(known.config)
        destinations = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - destinations)
        if unknown:
            raise ValueError(f"--config {known.config}: unknown options {unknown}")
        for action in parser._actions:
            if action.dest in values:
                action.required = False  # satisfied by the file; a flag still overrides it
        parser.set_defaults(**values)
    namespace = parser.parse_args(args)
    fields = vars(namespace)
    fields.pop("config")
    instances = []
    for dataclass_type in dataclass_types:
        names = {f.name for f in dataclass_type.__dataclass_fields__.values() if f.init}
        instances.append(dataclass_type(**{k: fields.pop(k) for k in list(fields) if k in names}))
    return tuple(instances)
