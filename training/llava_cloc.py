"""Put a trained CLOC image tower into a LLaVA model built around any causal language model, then generate.

    python examples/llava_cloc.py --cloc_model CLOC_DIR --language_model LM_DIR \
        [--image photo.jpg] [--box 10 20 120 90] [--output_dir llava_cloc]
    occlip-cloc-llava-cloc ...   # the same, installed

`CLOC_DIR` is a CLOC folder saved with its processor; `LM_DIR` a causal LM folder with its tokenizer. The script
builds `LlavaForConditionalGeneration` with `CLOCVisionModel` (Prompter included) as its vision tower, copies the
tower and language-model weights in, adds `<image>` and `<region>` tokens, and generates twice:

1. the ordinary LLaVA path: the image's patch features (layer `--vision_feature_layer`) replace the `<image>` tokens;
2. the region-token path (Ferret-style): each `<region>` token in `--region_prompt` is replaced by the
   multi-modal projection of the Prompter's region hidden state for one `--box` (original pixels).

The projector is new and untrained, so the text is meaningless until the LLaVA model is trained (stage 1 trains
the projector); the point is the wiring. Without `--image` a drawn scene is used.

`--output_dir DIR` writes a LLaVA folder that stock transformers loads (`LlavaForConditionalGeneration
.from_pretrained(DIR)`, no package, no `trust_remote_code`): its vision tower is the CLOC tower exported as a plain
`clip_vision_model`. The Prompter goes to the side-car `DIR/prompter`; `load_llava_with_prompter(DIR)` (this package)
puts it back for region tokens.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
)

from modeling_cloc import CLOCVisionModel
from processing import CLOCProcessor
from processing.files import folder_overlap
from training.cli import parse_args

IMAGE_TOKEN, REGION_TOKEN = "<image>", "<region>"
PROMPTER_DIR = "prompter"  # side-car folder inside --output_dir


@dataclass
class LlavaClocArguments:
    """Options of `examples/llava_cloc.py` / `occlip-cloc-llava-cloc`."""

    cloc_model: str = field(metadata={"help": "folder of a CLOC model saved with its processor"})
    language_model: str = field(metadata={"help": "folder of a causal language model with its tokenizer"})
    image: str | None = field(default=None, metadata={"help": "image file (default: a drawn scene)"})
    box: list[float] | None = field(
        default=None, metadata={"help": "x0 y0 x1 y1 in image pixels, several boxes as 8, 12, ... numbers"}
    )
    prompt: str = "Describe the image."
    region_prompt: str = f"What is in {REGION_TOKEN}?"
    max_new_tokens: int = 20
    vision_feature_layer: int = -2
    output_dir: str | None = field(
        default=None,
        metadata={"help": "save a stock-transformers LLaVA (CLIP tower) + processor, and the Prompter in prompter/"},
    )
    seed: int = 0


def drawn_scene(size: int = 96) -> tuple[Image.Image, list[float]]:
    """A grey image with a red square; returns it and the square's box in pixels."""
    array = np.full((size, size, 3), 128, dtype=np.uint8)
    x0, y0, x1, y1 = size // 8, size // 4, size // 2, 5 * size // 8
    array[y0:y1, x0:x1] = (220, 30, 30)
    return Image.fromarray(array), [float(x0), float(y0), float(x1), float(y1)]


def build_llava(
    tower: PreTrainedModel,
    language_model: PreTrainedModel,
    tokenizer,
    image_processor,
    vision_feature_layer: int = -2,
    region_token: bool = True,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA model around `language_model` whose vision tower is `tower` (weights copied), and its processor.

    `tower` is a ViT with CLIP's layout: a `CLOCVisionModel`, or a stock `CLIPVisionModel` (what
    `examples/llava_occlip.py` passes). Adds the `<image>` special token to `tokenizer` (and the embedding matrix),
    and `<region>` with `region_token`; the projector is freshly initialised.
    """
    tokens = [IMAGE_TOKEN, REGION_TOKEN] if region_token else [IMAGE_TOKEN]
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    vision = tower.config
    patches = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=language_model.config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=patches,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    llava.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    llava.resize_token_embeddings(len(tokenizer))
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return llava.eval(), processor


def check_output_dir(output_dir, **inputs) -> None:
    """`ValueError` before any work when `output_dir` is, contains or lies inside an input folder (`flag=path`): the
    saved LLaVA model would overwrite the model it was built from."""
    if output_dir is None:
        return
    output = Path(output_dir).resolve()
    for flag, path in inputs.items():
        source = Path(path).resolve()
        if folder_overlap(output, source) is not None:
            raise ValueError(
                f"--output_dir {output_dir} overlaps --{flag} {path}: saving would overwrite the input model; "
                "choose a separate --output_dir"
            )


def export_llava(llava: LlavaForConditionalGeneration, processor: LlavaProcessor, output_dir) -> None:
    """Save `llava` so that stock transformers loads it: the CLOC tower as a plain `clip_vision_model`, and the
    Prompter as a side-car in `output_dir/prompter` (`load_llava_with_prompter` re-attaches it).

    Why not the CLOC tower itself: LLaVA's config resolves `vision_config` through transformers' static model-type
    table, which remote code (`trust_remote_code`, `auto_map`) cannot extend, so a `cloc_vision_model` vision
    config fails to load ("Unrecognized model type for subconfig") wherever this package is not imported.
    """
    tower = llava.model.vision_tower
    if not isinstance(tower, CLOCVisionModel) or tower.prompter is None:
        raise ValueError("export_llava expects a LLaVA model whose vision tower is a CLOCVisionModel with a Prompter")
    fields = llava.config.to_dict()
    fields.pop("architectures", None)
    fields["vision_config"] = tower.clip_vision_config().to_dict()
    stock = LlavaForConditionalGeneration(LlavaConfig(**fields))
    prompter_keys = "model.vision_tower.prompter."
    stock.load_state_dict({k: v for k, v in llava.state_dict().items() if not k.startswith(prompter_keys)})
    stock.generation_config = llava.generation_config
    stock.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    tower.save_prompter(Path(output_dir) / PROMPTER_DIR)


def load_llava_with_prompter(folder) -> LlavaForConditionalGeneration:
    """Load an `export_llava` folder and put the side-car Prompter back on its CLIP tower (region tokens work)."""
    llava = LlavaForConditionalGeneration.from_pretrained(folder)
    llava.model.vision_tower = CLOCVisionModel.attach_prompter(llava.model.vision_tower, Path(folder) / PROMPTER_DIR)
    return llava


def region_inputs_embeds(
    llava: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    boxes: torch.Tensor,
    region_token_id: int,
) -> torch.Tensor:
    """Token embeddings of `input_ids` with the i-th `<region>` of each row replaced by the projected region
    hidden state of box i (`boxes` `[B, R, 4]`, normalised to the processed frame). `<image>` tokens are left in
    place for LLaVA's own image merge."""
    embeds = llava.get_input_embeddings()(input_ids)
    is_region = input_ids == region_token_id
    counts = is_region.sum(-1)
    if not torch.all(counts == boxes.shape[1]):
        raise ValueError(
            f"each prompt needs one {REGION_TOKEN} per box: found {counts.tolist()}, boxes {boxes.shape[1]}"
        )
    regions = llava.model.vision_tower(pixel_values, input_boxes=boxes).region_hidden_states
    tokens = llava.model.multi_modal_projector(regions).to(embeds.dtype)
    return embeds.masked_scatter(is_region[..., None], tokens)


def pixel_boxes(values: list[float] | None) -> list[list[float]] | None:
    """`--box` numbers grouped in fours (`ValueError` when the count is not a multiple of 4)."""
    if values is None:
        return None
    if len(values) % 4:
        raise ValueError(f"--box takes x0 y0 x1 y1 per box; got {len(values)} numbers")
    return [list(values[i : i + 4]) for i in range(0, len(values), 4)]


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    """Run both generations; returns `{"image_answer": str, "region_answer": str}` (and prints them)."""
    (args,) = parse_args(LlavaClocArguments, args=argv)
    check_output_dir(args.output_dir, cloc_model=args.cloc_model, language_model=args.language_model)
    torch.manual_seed(args.seed)
    tower = CLOCVisionModel.from_pretrained(args.cloc_model)
    if tower.prompter is None:
        raise ValueError(f"{args.cloc_model} holds no Prompter: pass a full CLOC folder")
    cloc_processor = CLOCProcessor.from_pretrained(args.cloc_model)
    language_model = AutoModelForCausalLM.from_pretrained(args.language_model)
    tokenizer = AutoTokenizer.from_pretrained(args.language_model)
    llava, processor = build_llava(
        tower, language_model, tokenizer, cloc_processor.image_processor, args.vision_feature_layer
    )
    if args.image is not None:
        image, boxes = Image.open(args.image).convert("RGB"), pixel_boxes(args.box)
    else:
        image, default_box = drawn_scene()
        boxes = pixel_boxes(args.box) or [default_box]
    if boxes is None:
        boxes = [[0.0, 0.0, float(image.width), float(image.height)]]

    inputs = processor(images=image, text=f"{IMAGE_TOKEN}\n{args.prompt}", return_tensors="pt")
    generated = llava.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    image_answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    region_prompt = args.region_prompt
    if region_prompt.count(REGION_TOKEN) != len(boxes):
        raise ValueError(f"--region_prompt needs one {REGION_TOKEN} per box ({len(boxes)} boxes): {region_prompt!r}")
    inputs = processor(images=image, text=f"{IMAGE_TOKEN}\n{region_prompt}", return_tensors="pt")
    normalised = cloc_processor(images=image, input_boxes=[boxes])
    embeds = region_inputs_embeds(
        llava,
        inputs["input_ids"],
        inputs["pixel_values"],
        normalised["input_boxes"],
        tokenizer.convert_tokens_to_ids(REGION_TOKEN),
    )
    generated = llava.generate(
        inputs_embeds=embeds,
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
    )
    region_answer = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"image prompt:  {args.prompt!r} -> {image_answer!r}")
    print(f"region prompt: {region_prompt!r} with boxes {boxes} -> {region_answer!r}")
    if args.output_dir is not None:
        export_llava(llava, processor, args.output_dir)
        print(
            f"saved a stock LLaVA model (CLIP vision tower) and processor to {args.output_dir}, "
            f"and the Prompter side-car to {Path(args.output_dir) / PROMPTER_DIR}"
        )
    return {"image_answer": image_answer, "region_answer": region_answer}


if __name__ == "__main__":
    main()
