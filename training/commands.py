"""The package's command lines: the three trainers, VESL, the synthetic data writer and the open_clip converter;
the console scripts of the synthetic benchmark and the LLaVA scripts, whose code lives in their own modules.

Each `NAME(argv)` parses its options (flags, or keys of a `--config` YAML/JSON file; see `--help`) and returns its
result for code and tests. `examples/*.py` are thin wrappers over these functions, and the console scripts of
`pyproject.toml` (`occlip-cloc-train-occlip`, ...) call the `*_script` variants, which return nothing: a console
script passes its function's return value to `sys.exit`, which would turn a metrics dict into exit status 1.

    occlip-cloc-train-occlip --train_data DIR --init_from CLIP_DIR --output_dir OUT --max_steps 1000
    accelerate launch examples/train_cloc.py --train_data DIR --model_config cfg.json --output_dir OUT
    occlip-cloc-vesl --input DATA --output_dir OUT --captioner MODEL
    occlip-cloc-make-synthetic-data --output_dir DIR --num_images 2000 --jitter
    occlip-cloc-convert-open-clip --checkpoint model.safetensors --model_config ViT-B-16.json --output_dir CLIP_DIR
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from processing.open_clip_conversion import (
    OpenClipConversionError,
    from_open_clip,
    load_open_clip_state_dict,
    open_clip_processor,
)
from processing.vesl import VeslArguments, annotate

from . import llava_cloc, llava_occlip, synthetic_benchmark
from .cli import parse_args
from .synthetic import SceneConfig, make_synthetic_dataset
from .trainer import ContrastiveTrainingArguments, train


def _train(family: str, argv: list[str] | None) -> dict:
    (args,) = parse_args(ContrastiveTrainingArguments, args=argv)
    return train(args, family)


def train_clip(argv: list[str] | None = None) -> dict:
    """Train CLIP (from scratch with `--model_config`, or from a CLIP folder with `--init_from`); final metrics."""
    return _train("clip", argv)


def train_occlip(argv: list[str] | None = None) -> dict:
    """Train OC-CLIP (from scratch with `--model_config`, or from a CLIP folder with `--init_from`); final metrics."""
    return _train("occlip", argv)


def train_cloc(argv: list[str] | None = None) -> dict:
    """Train CLOC (from scratch with `--model_config`, or from a CLIP folder with `--init_from`); final metrics."""
    return _train("cloc", argv)


def vesl_annotate(argv: list[str] | None = None) -> dict | None:
    """Write VESL region-text pseudo-labels; the run's statistics on the main process once complete, else None."""
    (args,) = parse_args(VeslArguments, args=argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("processing").setLevel(logging.INFO)  # per-process shard reports and skipped images
    return annotate(args)


@dataclass
class SyntheticDataArguments:
    """Options of `occlip-cloc-make-synthetic-data` / `examples/make_synthetic_data.py`."""

    output_dir: str = field(metadata={"help": "folder to write train/, test_*/, val_*/ into"})
    num_images: int = field(
        default=2000, metadata={"help": "training images (every other split gets a fifth of this)"}
    )
    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    use_sizes: bool = False
    held_out_fraction: float = field(default=0.3, metadata={"help": "fraction of object pairs kept out of training"})
    jitter: bool = field(
        default=False,
        metadata={"help": "object sides uniform in [0.19, 0.33] of the image, grey background in [185, 215]"},
    )
    validation: bool = field(default=True, metadata={"help": "also write val_seen/ and val_unseen/"})


def make_synthetic_data(argv: list[str] | None = None) -> dict:
    """Write the synthetic binding/localisation dataset; returns `{split: rows}`."""
    (args,) = parse_args(SyntheticDataArguments, args=argv)
    config = SceneConfig(
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        use_sizes=args.use_sizes,
        held_out_fraction=args.held_out_fraction,
        jitter=args.jitter,
    )
    counts = make_synthetic_dataset(args.output_dir, args.num_images, args.seed, config, validation=args.validation)
    print(f"wrote {counts} to {args.output_dir}")
    return counts


@dataclass
class ConvertOpenClipArguments:
    """Options of `occlip-cloc-convert-open-clip` / `examples/convert_open_clip.py`."""

    checkpoint: str = field(metadata={"help": "open_clip weights: .safetensors, or .bin/.pt (weights_only load)"})
    model_config: str = field(metadata={"help": "open_clip model JSON or a Hub open_clip_config.json"})
    output_dir: str = field(metadata={"help": "folder to write the transformers CLIP model and processor to"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a model already in output_dir"})


def convert_open_clip(argv: list[str] | None = None) -> Path:
    """Convert an open_clip checkpoint into a transformers CLIP folder (model + processor); returns the folder."""
    (args,) = parse_args(ConvertOpenClipArguments, args=argv)
    output = Path(args.output_dir)
    if (output / "config.json").exists() and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {output} already holds a model; pass --overwrite_output_dir to replace it.")
    with open(args.model_config) as handle:
        model_config = json.load(handle)
    model = from_open_clip(load_open_clip_state_dict(args.checkpoint), model_config)
    model.save_pretrained(output)
    try:
        open_clip_processor(model_config).save_pretrained(output)
    except OpenClipConversionError as error:
        # The weights are still right; only the preprocessing could not be expressed as a CLIPProcessor.
        print(f"no processor written: {error}")
    print(f"wrote a transformers CLIPModel to {output}")
    return output


def _console_script(command: Callable[[list[str] | None], object]) -> Callable[[], None]:
    def script() -> None:
        command(None)

    script.__name__ = f"{command.__name__}_script"
    script.__qualname__ = script.__name__
    script.__doc__ = f"Console script: `{command.__name__}` on the command line's options; exit status 0 when done."
    return script


train_clip_script = _console_script(train_clip)
train_occlip_script = _console_script(train_occlip)
train_cloc_script = _console_script(train_cloc)
vesl_annotate_script = _console_script(vesl_annotate)
make_synthetic_data_script = _console_script(make_synthetic_data)
convert_open_clip_script = _console_script(convert_open_clip)
synthetic_benchmark_script = _console_script(synthetic_benchmark.main)
llava_cloc_script = _console_script(llava_cloc.main)
llava_occlip_script = _console_script(llava_occlip.main)
