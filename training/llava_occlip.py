"""Put a trained OC-CLIP image tower into a LLaVA model built around any causal language model, then generate.

    python examples/llava_occlip.py --occlip_model OCCLIP_DIR --language_model LM_DIR \
        [--image photo.jpg] [--output_dir llava_occlip]
    occlip-cloc-llava-occlip ...   # the same, installed

`OCCLIP_DIR` is an OC-CLIP folder saved with its processor; `LM_DIR` a causal LM folder with its tokenizer.
OC-CLIP's image tower is a plain CLIP ViT (the binding module and scene-graph text side stay behind), so it is
exported as a stock `clip_vision_model` (`OCCLIPVisionModel.export_clip_vision`, with OC-CLIP's own image
processor) and the LLaVA model is built around that (`training.llava_cloc.build_llava`). The image's patch features
(layer `--vision_feature_layer`) replace the `<image>` tokens; the projector is new and untrained, so the answer is
meaningless until the LLaVA model is trained. Without `--image` a drawn scene is used.

`--output_dir DIR` writes a LLaVA folder that stock transformers loads (`LlavaForConditionalGeneration
.from_pretrained(DIR)`: no package, no `trust_remote_code`), and the exported tower alone in `DIR/vision_tower`
for code that loads `CLIPVisionModel` / `CLIPImageProcessor` from a tower folder (original LLaVA's
`--vision_tower`). A LLaVA config holding an `occlip_vision_model` would not load without this package: LLaVA
resolves its `vision_config` through transformers' static model-type table, which remote code cannot extend.
"""

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from modeling_occlip import OCCLIPVisionModel
from processing import OCCLIPProcessor
from training.cli import parse_args
from training.llava_cloc import IMAGE_TOKEN, build_llava, check_output_dir, drawn_scene

TOWER_DIR = "vision_tower"  # the exported CLIP tower inside --output_dir


@dataclass
class LlavaOcclipArguments:
    """Options of `examples/llava_occlip.py` / `occlip-cloc-llava-occlip`."""

    occlip_model: str = field(metadata={"help": "folder of an OC-CLIP model saved with its processor"})
    language_model: str = field(metadata={"help": "folder of a causal language model with its tokenizer"})
    image: str | None = field(default=None, metadata={"help": "image file (default: a drawn scene)"})
    prompt: str = "Describe the image."
    max_new_tokens: int = 20
    vision_feature_layer: int = -2
    output_dir: str | None = field(
        default=None,
        metadata={"help": "save a stock-transformers LLaVA + processor, and the CLIP tower alone in vision_tower/"},
    )
    seed: int = 0


def export_occlip_tower(occlip_model: str, folder) -> CLIPVisionModel:
    """OC-CLIP's image tower written to `folder` as a stock CLIP tower with OC-CLIP's image processor, and loaded
    back as the `CLIPVisionModel` a LLaVA model takes."""
    tower = OCCLIPVisionModel.from_pretrained(occlip_model)
    image_processor = OCCLIPProcessor.from_pretrained(occlip_model).image_processor
    tower.export_clip_vision(folder, image_processor)
    return CLIPVisionModel.from_pretrained(folder)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    """Build the LLaVA model, answer `--prompt` about the image; returns `{"image_answer": str}` (and prints it)."""
    (args,) = parse_args(LlavaOcclipArguments, args=argv)
    check_output_dir(args.output_dir, occlip_model=args.occlip_model, language_model=args.language_model)
    torch.manual_seed(args.seed)
    occlip_processor = OCCLIPProcessor.from_pretrained(args.occlip_model)
    language_model = AutoModelForCausalLM.from_pretrained(args.language_model)
    tokenizer = AutoTokenizer.from_pretrained(args.language_model)
    with tempfile.TemporaryDirectory() as scratch:
        tower_dir = Path(args.output_dir) / TOWER_DIR if args.output_dir is not None else Path(scratch)
        tower = export_occlip_tower(args.occlip_model, tower_dir)
        llava, processor = build_llava(
            tower,
            language_model,
            tokenizer,
            occlip_processor.image_processor,
            args.vision_feature_layer,
            region_token=False,
        )
    image = Image.open(args.image).convert("RGB") if args.image is not None else drawn_scene()[0]
    inputs = processor(images=image, text=f"{IMAGE_TOKEN}\n{args.prompt}", return_tensors="pt")
    generated = llava.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    image_answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"image prompt: {args.prompt!r} -> {image_answer!r}")
    if args.output_dir is not None:
        llava.save_pretrained(args.output_dir)
        processor.save_pretrained(args.output_dir)
        print(f"saved a stock LLaVA model (CLIP vision tower) and processor to {args.output_dir}")
    return {"image_answer": image_answer}


if __name__ == "__main__":
    main()
