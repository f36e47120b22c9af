"""The offline binding and localisation benchmark (the main job): a base CLIP trained on synthetic scenes, then
CLIP, CLIP + hard negatives, OC-CLIP and CLOC fine-tuned from it and evaluated on seen and unseen object pairs.

    python examples/synthetic_benchmark.py --output_dir DIR [--full]

A thin wrapper: the benchmark is `training/synthetic_benchmark.py` (outputs and options described there), also run
as `python -m training.synthetic_benchmark` or the console script `occlip-cloc-synthetic-benchmark`.
"""

from training.synthetic_benchmark import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
