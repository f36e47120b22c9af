"""Write the synthetic binding/localisation dataset (`train/`, `test_*/`, `val_*/` imagefolders).

    python examples/make_synthetic_data.py --output_dir DIR --num_images 2000 --seed 0 [--use_sizes] [--jitter]

With `--jitter`, `test_seen_plain/` and `test_unseen_plain/` (jitter off) are written too; `--no_validation` skips
`val_seen/` and `val_unseen/`.

The vocabulary, colours, sizes and rules are documented in the README ("Synthetic scenes").
"""

from dataclasses import dataclass, field

from training.cli import parse_args
from training.synthetic import SceneConfig, make_synthetic_dataset


@dataclass
class SyntheticDataArguments:
    """Options of `examples/make_synthetic_data.py`."""

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


def main(argv: list[str] | None = None) -> dict:
    """Write the dataset; returns `{split: rows}`."""
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


if __name__ == "__main__":
    main()
