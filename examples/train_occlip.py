"""Train OC-CLIP with Accelerate: from scratch (`--model_config cfg.json`) or from a transformers CLIP folder
(`--init_from DIR`, `--finetune_mode full|frozen|lora`).

    accelerate launch examples/train_occlip.py --train_data DIR --init_from CLIP_DIR --output_dir OUT --max_steps 1000
    python examples/train_occlip.py --config examples/configs/occlip_finetune.yaml --train_data DIR --output_dir OUT
    python examples/train_occlip.py --dataset_name SAVED_DIR_OR_HUB_ID --caption_column text --model_config cfg.json \
        --output_dir OUT --max_steps 1000

Every option is a flag (see `--help`) or a key of the `--config` YAML/JSON file; `OUT` ends up holding the model,
processor and model card, and resumable state under `OUT/checkpoints/` (`--resume_from_checkpoint latest`).

A thin wrapper: the command is `training.commands.train_occlip`, installed as the console script `occlip-cloc-train-occlip`.
"""

from training.commands import train_occlip as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
