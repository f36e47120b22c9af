"""Convert an open_clip checkpoint into a transformers CLIP folder (model + processor), without open_clip.

    python examples/convert_open_clip.py --checkpoint open_clip_model.safetensors \
        --model_config open_clip_config.json --output_dir clip-vit-b-16

`--checkpoint` is a `.safetensors` file or a torch file (`.bin`/`.pt`, loaded with `weights_only=True`);
`--model_config` is open_clip's model JSON (`model_configs/ViT-B-16.json`) or a Hub `open_clip_config.json`
(whose `preprocess_cfg` sets the image mean/std). The folder loads with `CLIPModel.from_pretrained` and is a valid
`--init_from` for `train_occlip.py` / `train_cloc.py` (or `OCCLIPModel.from_clip` / `CLOCModel.from_clip`).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from processing.open_clip_conversion import (
    OpenClipConversionError,
    from_open_clip,
    load_open_clip_state_dict,
    open_clip_processor,
)
from training.cli import parse_args


@dataclass
class ConvertOpenClipArguments:
    """Options of `examples/convert_open_clip.py`."""

    checkpoint: str = field(metadata={"help": "open_clip weights: .safetensors, or .bin/.pt (weights_only load)"})
    model_config: str = field(metadata={"help": "open_clip model JSON or a Hub open_clip_config.json"})
    output_dir: str = field(metadata={"help": "folder to write the transformers CLIP model and processor to"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace a model already in output_dir"})


def main(argv: list[str] | None = None) -> Path:
    """Convert and save; returns the output folder."""
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


if __name__ == "__main__":
    main()
