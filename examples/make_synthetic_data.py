"""Write the synthetic binding/localisation dataset (`train/`, `test_*/`, `val_*/` imagefolders).

    python examples/make_synthetic_data.py --output_dir DIR --num_images 2000 --seed 0 [--use_sizes] [--jitter]

With `--jitter`, `test_seen_plain/` and `test_unseen_plain/` (jitter off) are written too; `--no_validation` skips
`val_seen/` and `val_unseen/`.

The vocabulary, colours, sizes and rules are documented in the README ("Synthetic scenes").

A thin wrapper: the command is `training.commands.make_synthetic_data`, installed as the console script `occlip-cloc-make-synthetic-data`.
"""

from training.commands import SyntheticDataArguments
from training.commands import make_synthetic_data as main

__all__ = ["main", "SyntheticDataArguments"]

if __name__ == "__main__":
    main()
