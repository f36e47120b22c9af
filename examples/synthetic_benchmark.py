"""The offline binding and localisation benchmark: train CLIP, OC-CLIP and CLOC on the same synthetic scenes with
the package's trainer, evaluate on seen and unseen object pairs, print one table.

    python examples/synthetic_benchmark.py --output_dir DIR [--full]

Writes `DIR/data/` (the scenes), `DIR/<model>/` (model + processor + card, loadable with `AutoModel` /
`AutoProcessor`), `DIR/results.json` (`{model: {split: {metric: value}}}`), `DIR/results.png` (chart) and
`DIR/binding_maps.png` (OC-CLIP's node attention and CLOC's grounded boxes on test images). `--full` trains
longer with 3 seeds and reports mean ± std.
"""

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModel, AutoProcessor

import modeling_cloc  # noqa: F401  (registers the models)
import modeling_occlip  # noqa: F401
from training.cli import parse_args
from training.data import load_image_text_dataset, open_image
from training.evaluation import ImageTextScorer, evaluate_synthetic
from training.synthetic import SceneConfig, make_synthetic_dataset
from training.trainer import TrainingArguments, train

# model name -> (trainer family, extra config, how regions are evaluated)
MODELS = {
    "clip": ("clip", {}, None),
    "clip_hard_negatives": ("clip", {}, None),  # trained with one hard-negative caption per image (NegCLIP)
    "occlip": ("occlip", {}, None),
    "cloc": ("cloc", {}, "model"),
    "cloc_roi": ("cloc", {"region_head": "roi_align"}, "model"),
    "clip_crop": (None, {}, "crop"),  # the trained CLIP, regions cropped and encoded as images
}
TARGETS = {
    ("occlip", "attribute_swap"): ">= 0.95 and >= CLIP + 0.25 (unseen)",
    ("occlip", "relation_swap"): ">= 0.90 (unseen)",
    ("cloc", "region_classification"): ">= 0.95 and >= crop/RoI + 0.30",
    ("cloc", "grounding_acc50"): ">= 0.90",
}


@dataclass
class BenchmarkArguments:
    """Options of `examples/synthetic_benchmark.py`."""

    output_dir: str = field(metadata={"help": "where data, models, results.json and the PNGs go"})
    full: bool = field(default=False, metadata={"help": "longer training, 3 seeds, mean ± std"})
    num_images: int | None = field(default=None, metadata={"help": "training images (default 1500; 4000 full)"})
    max_steps: int | None = field(default=None, metadata={"help": "steps per model (default 250; 1500 full)"})
    per_device_train_batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    image_size: int = 64
    width: int = 128
    layers: int = 3
    models: list[str] = field(default_factory=lambda: list(MODELS))
    disable_tqdm: bool = False


def model_config(family: str, args: BenchmarkArguments, extra: dict) -> dict:
    """Small towers shared by every model (same sizes, same steps)."""
    heads = max(1, args.width // 32)
    common = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers)
    common.update(num_attention_heads=heads, projection_dim=args.width)
    config = {
        "text_config": {**common, "max_position_embeddings": 77},
        "vision_config": {**common, "image_size": args.image_size, "patch_size": 8},
        "projection_dim": args.width,
    }
    if family == "occlip":
        config["binding_config"] = {"hidden_size": args.width, "num_attention_heads": heads, "num_hidden_layers": 2}
    return {**config, **extra}


def train_one(name: str, args: BenchmarkArguments, data: Path, seed: int, out: Path) -> Path:
    """Train model `name` with the package's trainer; returns its folder."""
    family, extra, _ = MODELS[name]
    folder = out / name if seed == args.seed else out / f"{name}_seed{seed}"
    config_path = out / f"{name}_config.json"
    config_path.write_text(json.dumps(model_config(family, args, extra)))
    steps = args.max_steps or (1500 if args.full else 250)
    train(
        TrainingArguments(
            train_data=str(data / "train"),
            output_dir=str(folder),
            model_config=str(config_path),
            max_steps=steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            learning_rate=args.learning_rate,
            warmup_steps=max(1, steps // 20),
            weight_decay=0.1,
            seed=seed,
            logging_steps=max(1, steps // 10),
            max_regions=4,
            hard_negatives=name == "clip_hard_negatives",
            disable_tqdm=args.disable_tqdm,
        ),
        family,
    )
    return folder


def evaluate(name: str, folder: Path, data: Path) -> dict:
    """`{split: metrics}` of a trained folder."""
    family, _, region_mode = MODELS[name]
    model = AutoModel.from_pretrained(folder)
    family = family or "clip"
    scorer = ImageTextScorer(model, AutoProcessor.from_pretrained(folder), family)
    results = {}
    for split in ("seen", "unseen"):
        metrics = evaluate_synthetic(scorer, data / f"test_{split}", region_mode)
        if name == "clip_crop":  # only the region metric is this baseline's own
            metrics = {k: v for k, v in metrics.items() if k == "region_classification"}
        if name in ("cloc_roi",):
            metrics = {k: v for k, v in metrics.items() if k in ("region_classification", "grounding_acc50")}
        results[split] = metrics
    return results


def summarise(per_seed: list[dict]) -> dict:
    """Mean (and std over seeds) of each metric."""
    summary = {}
    for name in per_seed[0]:
        summary[name] = {}
        for split in per_seed[0][name]:
            summary[name][split] = {}
            for metric in per_seed[0][name][split]:
                values = [run[name][split][metric] for run in per_seed]
                summary[name][split][metric] = statistics.fmean(values)
                if len(values) > 1:
                    summary[name][split][f"{metric}_std"] = statistics.stdev(values)
    return summary


def print_table(results: dict) -> str:
    """The results as a text table (rows: model x split), with targets next to the measured numbers."""
    metrics = ["attribute_swap", "relation_swap", "shape_replace", "colour_replace"]
    metrics += ["region_classification", "grounding_acc50"]
    lines = [f"{'model':20} {'split':7} " + " ".join(f"{m[:14]:>14}" for m in metrics)]
    for name, splits in results.items():
        for split, values in splits.items():
            cells = []
            for m in metrics:
                if m in values:
                    std = values.get(f"{m}_std")
                    cells.append(f"{values[m]:>8.3f}" + (f"±{std:.3f}" if std is not None else "      "))
                else:
                    cells.append(f"{'-':>14}")
            lines.append(f"{name:20} {split:7} " + " ".join(cells))
    lines.append("targets: " + "; ".join(f"{model} {metric} {target}" for (model, metric), target in TARGETS.items()))
    table = "\n".join(lines)
    print(table)
    return table


def draw_chart(results: dict, path: Path) -> None:
    """Bars of each model's unseen-pair metrics (PIL only)."""
    metrics = ["attribute_swap", "relation_swap", "region_classification", "grounding_acc50"]
    names = list(results)
    width, height, bar = 160 * len(metrics), 300, max(6, 140 // max(1, len(names)))
    image = Image.new("RGB", (width, height + 60), "white")
    draw = ImageDraw.Draw(image)
    palette = [(70, 110, 200), (220, 120, 40), (60, 160, 80), (190, 60, 60), (130, 90, 170), (120, 120, 120)]
    for m, metric in enumerate(metrics):
        x0 = 160 * m + 10
        draw.text((x0, height + 5), metric, fill="black")
        for n, name in enumerate(names):
            value = results[name].get("unseen", {}).get(metric)
            if value is None:
                continue
            top = height - int(value * (height - 20))
            draw.rectangle([x0 + n * bar, top, x0 + (n + 1) * bar - 2, height], fill=palette[n % len(palette)])
    for n, name in enumerate(names):
        draw.text((10 + 110 * n, height + 30), name, fill=palette[n % len(palette)])
    image.save(path)


@torch.no_grad()
def draw_binding_maps(out: Path, data: Path, count: int = 4) -> None:
    """OC-CLIP's per-node attention (last binding layer, heads averaged) and CLOC's grounded boxes, per image."""
    rows = list(load_image_text_dataset(str(data / "test_unseen")))[:count]
    images = [open_image(row, f"row {i}") for i, row in enumerate(rows)]
    tiles = []
    if (out / "occlip").is_dir():
        model = AutoModel.from_pretrained(out / "occlip").eval()
        processor = AutoProcessor.from_pretrained(out / "occlip")
        inputs = processor(images=images, scene_graphs=[row["scene_graph"] for row in rows])
        pixel = inputs.pop("pixel_values")
        attention = model.binding_attention(model.get_image_features(pixel), model.get_text_features(**inputs))[-1]
        grid = int(attention.shape[-1] ** 0.5)
        for i, image in enumerate(images):
            row_tiles = [image.resize((96, 96))]
            for node in range(len(rows[i]["scene_graph"]["objects"])):
                heat = attention[i, :, node].mean(0).view(grid, grid)
                heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-9)
                heat = (255 * heat).byte().numpy()
                row_tiles.append(Image.fromarray(heat).resize((96, 96), Image.NEAREST).convert("RGB"))
            tiles.append(row_tiles)
    if (out / "cloc").is_dir():
        model = AutoModel.from_pretrained(out / "cloc").eval()
        scorer = ImageTextScorer(model, AutoProcessor.from_pretrained(out / "cloc"), "cloc")
        predicted = scorer.ground(images, [[r["text"] for r in row["regions"]] for row in rows])
        for i, image in enumerate(images):
            canvas = image.resize((96, 96))
            draw = ImageDraw.Draw(canvas)
            scale = 96 / image.width
            for region, box in zip(rows[i]["regions"], predicted[i].tolist()):
                draw.rectangle([v * scale for v in region["bbox"]], outline=(0, 0, 0))
                draw.rectangle([v * scale for v in box], outline=(255, 255, 255))
            if i < len(tiles):
                tiles[i].append(canvas)
            else:
                tiles.append([canvas])
    if not tiles:
        return
    columns = max(len(t) for t in tiles)
    sheet = Image.new("RGB", (100 * columns, 100 * len(tiles)), "white")
    for r, row_tiles in enumerate(tiles):
        for c, tile in enumerate(row_tiles):
            sheet.paste(tile, (100 * c, 100 * r))
    sheet.save(out / "binding_maps.png")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the results dict written to `results.json`."""
    (args,) = parse_args(BenchmarkArguments, args=argv)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown models {unknown}; choose from {list(MODELS)}")
    out = Path(args.output_dir)
    data = out / "data"
    num_images = args.num_images or (4000 if args.full else 1500)
    make_synthetic_dataset(data, num_images, args.seed, SceneConfig(image_size=args.image_size))
    seeds = [args.seed, args.seed + 1, args.seed + 2] if args.full else [args.seed]
    per_seed = []
    for seed in seeds:
        results, folders = {}, {}
        for name in args.models:
            if MODELS[name][0] is None:
                continue
            folders[name] = train_one(name, args, data, seed, out)
            results[name] = evaluate(name, folders[name], data)
        if "clip_crop" in args.models and "clip" in folders:
            results["clip_crop"] = evaluate("clip_crop", folders["clip"], data)
        per_seed.append(results)
    results = summarise(per_seed)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    draw_chart(results, out / "results.png")
    draw_binding_maps(out, data)
    return results


if __name__ == "__main__":
    main()
