"""VESL: write region-text pseudo-labels (OWLv2 boxes captioned with caption noun phrases) for CLOC training.

    python examples/vesl_annotate.py --input DATA --output_dir OUT [--captioner MODEL] [--detector OWLV2]
    accelerate launch --num_processes 8 examples/vesl_annotate.py --input 'shards/*.tar' --output_dir OUT \\
        --captioner MODEL --dtype bfloat16 --output_format webdataset

`DATA` is an imagefolder (`metadata.jsonl`), WebDataset shards, Parquet files, a `save_to_disk` folder or a Hub
dataset id; each process takes every `num_processes`-th shard. A rerun with the same options resumes (finished
shards are skipped). `OUT` then trains CLOC directly: `examples/train_cloc.py --train_data OUT`. Every option is
a flag (see `--help`) or a key of a `--config` YAML/JSON file.

A thin wrapper: the command is `training.commands.vesl_annotate`, installed as the console script `occlip-cloc-vesl`.
"""

from training.commands import vesl_annotate as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
