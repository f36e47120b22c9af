"""Convert an open_clip checkpoint into a transformers CLIP folder (model + processor), without open_clip.

    python examples/convert_open_clip.py --checkpoint open_clip_model.safetensors \
        --model_config open_clip_config.json --output_dir clip-vit-b-16

`--checkpoint` is a `.safetensors` file or a torch file (`.bin`/`.pt`, loaded with `weights_only=True`);
`--model_config` is open_clip's model JSON (`model_configs/ViT-B-16.json`) or a Hub `open_clip_config.json`
(whose `preprocess_cfg` sets the image mean/std). The folder loads with `CLIPModel.from_pretrained` and is a valid
`--init_from` for `train_occlip.py` / `train_cloc.py` (or `OCCLIPModel.from_clip` / `CLOCModel.from_clip`).

A thin wrapper: the command is `training.commands.convert_open_clip`, installed as the console script `occlip-cloc-convert-open-clip`.
"""

from training.commands import ConvertOpenClipArguments
from training.commands import convert_open_clip as main

__all__ = ["main", "ConvertOpenClipArguments"]

if __name__ == "__main__":
    main()
