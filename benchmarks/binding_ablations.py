"""One ablation row of the synthetic benchmark, fast: an in-memory loop on the validation splits only.

    python benchmarks/binding_ablations.py --family occlip --module '{"initializer_range": 0.02}' [--seed 1]
    python benchmarks/binding_ablations.py --family cloc --module '{"box_attention_bias": 4}' --backbone_lr 1e-4

Draws the scenes in memory (train as `training.synthetic.make_synthetic_dataset` draws them; `val_seen` /
`val_unseen` from their own streams, never the test splits), trains a base CLIP once (cached as a safetensors
file under `--cache_dir`), fine-tunes OC-CLIP or CLOC from it with `--module` as the binding / Prompter settings
and `--config` as top-level settings, and prints validation metrics every `--eval_every` steps: attribute and
relation swap (OC-CLIP), region classification among the 30 phrases, its colour and shape parts, and grounding
accuracy at IoU 0.5 (CLOC). This is how the README's ablation tables were measured.
"""

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from modeling_cloc import CLOCModel
from modeling_occlip import OCCLIPModel
from training.synthetic import COLOURS, SHAPES, SceneConfig, generate_scene, held_out_pairs, object_pairs
from training.trainer import default_processor

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
PHRASES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw_splits(num_images: int, num_eval: int, seed: int, jitter: bool) -> dict:
    """`{split: {"pixels", "rows"}}` for train, val_seen and val_unseen (two-object validation scenes)."""
    config = SceneConfig(jitter=jitter)
    held = held_out_pairs(config, seed)
    splits = {
        "train": (random.Random(seed), lambda o: not (object_pairs(o) & held), num_images, None),
        "val_seen": (random.Random(f"{seed}:ablation_val_seen"), lambda o: not (object_pairs(o) & held), num_eval, 2),
        "val_unseen": (
            random.Random(f"{seed}:ablation_val_unseen"),
            lambda o: bool(object_pairs(o) & held),
            num_eval,
            2,
        ),
    }
    out = {}
    for name, (rng, allowed, count, objects) in splits.items():
        scenes = [generate_scene(rng, config, allowed, num_objects=objects) for _ in range(count)]
        pixels = np.stack([np.asarray(image, dtype=np.float32) / 255 for image, _ in scenes])
        out[name] = {
            "pixels": (torch.from_numpy(pixels).permute(0, 3, 1, 2) - MEAN) / STD,
            "rows": [r for _, r in scenes],
        }
    return out


def base_clip(width: int, layers: int, patch_size: int = 8) -> CLIPModel:
    """The demo's towers (64 px, patch 8 by default)."""
    common = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers)
    common.update(num_attention_heads=max(1, width // 32), projection_dim=width)
    text = {**common, "max_position_embeddings": 77}
    vision = {**common, "image_size": 64, "patch_size": patch_size}
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width))


def optimizer(model: nn.Module, lr: float, backbone_lr: float, new: tuple) -> torch.optim.AdamW:
    """AdamW with the trainer's grouping: no decay on 1-D parameters and logit scales, new modules at `lr`."""
    groups = {}
    for name, parameter in model.named_parameters():
        no_decay = parameter.ndim < 2 or "norm" in name or "logit_scale" in name
        key = (lr if name.startswith(new) else backbone_lr, 0.0 if no_decay else 0.1)
        groups.setdefault(key, []).append(parameter)
    return torch.optim.AdamW(
        [{"params": p, "lr": r, "weight_decay": w} for (r, w), p in groups.items()], betas=(0.9, 0.98)
    )


def train(model, steps: int, batch_of, seed: int, opt, evaluate, eval_every: int, batch: int, size: int):
    """Cosine schedule with 5% warmup; returns the validation records."""
    peaks = [group["lr"] for group in opt.param_groups]
    generator = torch.Generator().manual_seed(seed)
    records, started = [], time.time()
    for step in range(steps):
        warmup = max(1, steps // 20)
        factor = (
            (step + 1) / warmup
            if step < warmup
            else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        for group, peak in zip(opt.param_groups, peaks):
            group["lr"] = peak * factor
        model.train()
        inputs = batch_of(torch.randint(size, (batch,), generator=generator))
        out = model(**inputs, return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            for name in ("logit_scale", "region_logit_scale"):
                if hasattr(model, name):
                    getattr(model, name).clamp_(0, math.log(100))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            losses = {k: round(float(v.detach()), 3) for k, v in out.items() if k.startswith("loss") and v is not None}
            records.append({"step": step + 1, **losses, **evaluate(model), "seconds": round(time.time() - started)})
            print(records[-1], flush=True)
    return records


def _swap(graph: dict, kind: str) -> dict:
    graph = copy.deepcopy(graph)
    if kind == "attribute_swap":
        a, b = graph["objects"][0], graph["objects"][1]
        a["attributes"], b["attributes"] = b["attributes"], a["attributes"]
    else:
        relation = graph["relations"][0]
        relation["subject"], relation["object"] = relation["object"], relation["subject"]
    return graph


@torch.no_grad()
def evaluate_occlip(model, processor, split: dict) -> dict:
    """Attribute / relation swap accuracy on two-object scenes (graphs changed directly, so no parser is involved)."""
    model.eval()
    rows, image = split["rows"], model.get_image_features(split["pixels"])
    index = torch.arange(len(rows))

    def scores(graphs):
        text = model.get_graph_features(**processor.encode_graphs(processor.prepare_graphs(graphs)))
        return model.score_pairs(image, text, index, index, False)

    positive = scores([r["scene_graph"] for r in rows])
    results = {}
    for kind in ("attribute_swap", "relation_swap"):
        negatives = [_swap(r["scene_graph"], kind) for r in rows]
        keep = torch.tensor([n != r["scene_graph"] for n, r in zip(negatives, rows)])
        results[kind] = round(float((positive > scores(negatives))[keep].float().mean()), 3)
    return results


def region_inputs(rows: list[dict], tokenizer, max_regions: int = 3) -> dict:
    """Boxes (normalised; images are 64 px), region captions and image captions as CLOC's forward takes them."""
    boxes = torch.zeros(len(rows), max_regions, 4)
    mask = torch.zeros(len(rows), max_regions, dtype=torch.bool)
    texts = [[""] * max_regions for _ in rows]
    for b, row in enumerate(rows):
        for k, region in enumerate(row["regions"][:max_regions]):
            boxes[b, k], mask[b, k], texts[b][k] = torch.tensor(region["bbox"]) / 64, True, region["text"]
    regions = tokenizer([t for ts in texts for t in ts], padding="max_length", max_length=8, return_tensors="pt")
    captions = tokenizer(
        [r["caption"] for r in rows], padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    )
    return {
        "input_boxes": boxes,
        "box_mask": mask,
        "region_input_ids": regions["input_ids"].view(len(rows), max_regions, -1),
        "region_attention_mask": regions["attention_mask"].view(len(rows), max_regions, -1),
        "input_ids": captions["input_ids"],
        "attention_mask": captions["attention_mask"],
    }


@torch.no_grad()
def evaluate_cloc(model, tokenizer, split: dict) -> dict:
    """Region classification among the 30 phrases (and its colour / shape parts) and grounding accuracy@0.5."""
    model.eval()
    inputs = region_inputs(split["rows"], tokenizer)
    tokens = model.get_image_tokens(split["pixels"])
    mask = inputs["box_mask"]
    regions = model.get_region_features(image_tokens=tokens, input_boxes=inputs["input_boxes"], box_mask=mask)
    regions = regions.region_embeds[mask]
    classes = nn.functional.normalize(
        model.get_text_features(**tokenizer(PHRASES, padding=True, return_tensors="pt")).pooler_output, dim=-1
    )
    labels = torch.tensor([PHRASES.index(r["text"]) for row in split["rows"] for r in row["regions"][:3]])
    predicted = (regions @ classes.t()).argmax(-1)
    boxes = model.ground(
        image_tokens=tokens, input_ids=inputs["region_input_ids"], attention_mask=inputs["region_attention_mask"]
    ).predicted_boxes
    target = inputs["input_boxes"]
    low, high = torch.maximum(boxes[..., :2], target[..., :2]), torch.minimum(boxes[..., 2:], target[..., 2:])
    inter = (high - low).clamp(min=0).prod(-1)
    union = (
        (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1) + (target[..., 2:] - target[..., :2]).prod(-1) - inter
    )
    return {
        "region_classification": round(float((predicted == labels).float().mean()), 3),
        "colour": round(float((predicted // len(SHAPES) == labels // len(SHAPES)).float().mean()), 3),
        "shape": round(float((predicted % len(SHAPES) == labels % len(SHAPES)).float().mean()), 3),
        "grounding_acc50": round(float((inter / union)[mask].ge(0.5).float().mean()), 3),
    }


def main() -> None:
    """Parse the options, train (or reuse) the base, fine-tune one variant, print its validation curve."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=("occlip", "cloc"), required=True)
    parser.add_argument("--module", default="{}", help="JSON binding_config (occlip) or prompter_config (cloc)")
    parser.add_argument("--config", default="{}", help="JSON top-level config settings, e.g. grounding_loss")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--base_steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backbone_lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="data order and initialisation of the fine-tuning")
    parser.add_argument("--jitter", action="store_true")
    parser.add_argument("--num_images", type=int, default=1500)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--patch_size", type=int, default=8)
    parser.add_argument("--cache_dir", default="ablation_cache")
    parser.add_argument("--save_to", default=None, help="folder for the fine-tuned model (save_pretrained)")
    args = parser.parse_args()

    data = draw_splits(args.num_images, 300, 0, args.jitter)
    cache = (
        Path(args.cache_dir)
        / f"base_{args.base_steps}_{args.width}x{args.layers}_p{args.patch_size}_jitter{int(args.jitter)}.safetensors"
    )
    processor = default_processor(args.family, 64)
    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    base = base_clip(args.width, args.layers, args.patch_size)
    if cache.is_file():
        base.load_state_dict(load_file(cache))
    else:
        train_rows, pixels = data["train"]["rows"], data["train"]["pixels"]
        captions = tokenizer(
            [r["caption"] for r in train_rows],
            padding="max_length",
            max_length=32,
            truncation=True,
            return_tensors="pt",
        )
        opt = optimizer(base, 1e-3, 1e-3, ())
        train(
            base,
            args.base_steps,
            lambda i: {
                "pixel_values": pixels[i],
                "input_ids": captions["input_ids"][i],
                "attention_mask": captions["attention_mask"][i],
            },
            0,
            opt,
            lambda m: {},
            args.base_steps,
            args.batch,
            len(train_rows),
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, cache)

    torch.manual_seed(args.seed)
    module, extra = json.loads(args.module), json.loads(args.config)
    rows, pixels = data["train"]["rows"], data["train"]["pixels"]
    if args.family == "occlip":
        model = OCCLIPModel.from_clip(base, binding_config={"hidden_size": args.width, **module}, **extra)
        graphs = processor.encode_graphs(processor.prepare_graphs([r["scene_graph"] for r in rows]))
        batch_of = lambda i: {"pixel_values": pixels[i], **{k: v[i] for k, v in graphs.items()}}  # noqa: E731
        evaluate = lambda m: {s: evaluate_occlip(m, processor, data[s]) for s in ("val_unseen", "val_seen")}  # noqa: E731
        new = ("binding.", "similarity.")
    else:
        model = CLOCModel.from_clip(base, prompter_config=module, **extra)
        inputs = region_inputs(rows, tokenizer)
        batch_of = lambda i: {"pixel_values": pixels[i], **{k: v[i] for k, v in inputs.items()}}  # noqa: E731
        evaluate = lambda m: {s: evaluate_cloc(m, tokenizer, data[s]) for s in ("val_unseen", "val_seen")}  # noqa: E731
        new = ("prompter.", "box_head.", "roi_head.")
    opt = optimizer(model, args.lr, args.backbone_lr, new)
    train(model, args.steps, batch_of, args.seed, opt, evaluate, args.eval_every, args.batch, len(rows))
    if args.save_to:
        model.save_pretrained(args.save_to)


if __name__ == "__main__":
    main()
