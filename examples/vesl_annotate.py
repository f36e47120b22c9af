"""VESL: write region-text pseudo-labels (OWLv2 boxes captioned with caption noun phrases) for CLOC training.

    python examples/vesl_annotate.py --input DATA --output_dir OUT [--captioner MODEL] [--detector OWLV2]
    accelerate launch --num_processes 8 examples/vesl_annotate.py --input 'shards/*.tar' --output_dir OUT \\
        --captioner MODEL --dtype bfloat16 --output_format webdataset

`DATA` is an imagefolder (`metadata.jsonl`), WebDataset shards, Parquet files, a `save_to_disk` folder or a Hub
dataset id; each process takes every `num_processes`-th shard. A rerun with the same options resumes (finished
shards are skipped). `OUT` then trains CLOC directly: `examples/train_cloc.py --train_data OUT`. Every option is
a flag (see `--help`) or a key of a `--config` YAML/JSON file.
"""

import logging

from processing.vesl import VeslArguments, annotate
from training.cli import parse_args


def main(argv: list[str] | None = None) -> dict | None:
    """Parse the options and annotate; returns the run's statistics (on the main process, once complete)."""
    (args,) = parse_args(VeslArguments, args=argv)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("processing").setLevel(logging.INFO)  # per-process shard reports and skipped images
    return annotate(args)


if __name__ == "__main__":
    main()
