"""Write the synthetic binding/localisation dataset (`train/`, `test_seen/`, `test_unseen/` imagefolders).

    python examples/make_synthetic_data.py --output_dir DIR --num_images 2000 --seed 0 [--use_sizes true]

The vocabulary, colours, sizes and rules are documented in the README ("Synthetic scenes").
"""

from dataclasses import dataclass, field

from training.cli import parse_args
from training.synthetic import SceneConfig, make_synthetic_dataset


@dataclass
class SyntheticDataArguments:
    """Options of `examples/make_synthetic_data.py`."""

    output_dir: str = field(metadata={"help": "folder to write train/, test_seen/, test_unseen/ into"})
    num_images: int = field(default=2000, metadata={"help": "training images (each test split gets 20%)"})
    seed: int = 0
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 3
    use_sizes: bool = False
    held_out_fraction: float = field(default=0.3, metadata={"help": "fraction of object pairs kept out of training"})


def main(argv: list[str] | None = None) -> dict:
    """Write the dataset; returns `{split: rows}`."""
    (args,) = parse_args(SyntheticDataArguments, args=argv)
    config = SceneConfig(
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        use_sizes=args.use_sizes,
        held_out_fraction=args.held_out_fraction,
    )
    counts = make_synthetic_dataset(args.output_dir, args.num_images, args.seed, config)
    print(f"wrote {counts} to {args.output_dir}")
    return counts


if __name__ == "__main__":
    main()
