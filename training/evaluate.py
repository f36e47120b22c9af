"""Evaluate a saved CLIP, OC-CLIP or CLOC folder on one benchmark and write the metrics as JSON.

    python -m training.evaluate --model_dir DIR --benchmark aro --data_dir ARO_DIR --output_file aro.json
    occlip-cloc-evaluate --model_dir DIR --benchmark refcoco --data_dir refcoco/ --image_dir train2014/

Benchmarks and what `--data_dir` (and `--image_dir`, `--annotation_file`) name; the layouts are those of
`training/public_benchmarks.py`:

- `synthetic`: a split folder written by `training.synthetic` (e.g. `DATA/test_unseen`).
- `sugarcrepe`: the folder of `<category>.json` files; `--image_dir` the COCO val2017 images.
- `aro`: the folder holding `visual_genome_relation.json` and / or `visual_genome_attribution.json`;
  `--image_dir` the Visual Genome images (default `DATA_DIR/images`).
- `winoground`: the folder of `examples.jsonl` and `images/`.
- `coco_regions`: `--annotation_file` a COCO instances JSON (default `DATA_DIR/annotations/instances_val2017.json`),
  `--image_dir` its images (default `DATA_DIR/val2017`).
- `refcoco`: the `refer` folder with `refs(unc).p` (or `refs(umd).p`, `refs(google).p`, `refs.json`) and
  `instances.json`; `--image_dir` the COCO train2014 images; `--split` (default `val`).
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import public_benchmarks as pb
from .cli import parse_args
from .evaluation import ImageTextScorer, evaluate_synthetic
from .families import FAMILIES

BENCHMARKS = ("synthetic", "sugarcrepe", "aro", "winoground", "coco_regions", "refcoco")


@dataclass
class EvaluateArguments:
    """Options of `python -m training.evaluate` / `occlip-cloc-evaluate`."""

    model_dir: str = field(metadata={"help": "a saved model folder (save_pretrained of model and processor)"})
    benchmark: str = field(metadata={"help": "one of " + ", ".join(BENCHMARKS)})
    data_dir: str = field(metadata={"help": "the benchmark's folder (see the module doc for each layout)"})
    image_dir: str | None = field(
        default=None, metadata={"help": "image folder (sugarcrepe, aro, coco_regions, refcoco)"}
    )
    annotation_file: str | None = field(default=None, metadata={"help": "COCO instances JSON (coco_regions)"})
    split: str = field(default="val", metadata={"help": "RefCOCO split: val, testA, testB, test, ..."})
    output_file: str | None = field(
        default=None, metadata={"help": "JSON written (default MODEL_DIR/eval_BENCH.json)"}
    )
    batch_size: int = 32
    max_samples: int | None = field(default=None, metadata={"help": "evaluate only the first N samples / images"})
    region_mode: str | None = field(
        default=None, metadata={"help": "model (CLOC's region head) or crop (crop and encode); default by family"}
    )
    aro_exclude: list[str] | None = field(
        default=None, metadata={"help": "ARO relations / attribute pairs left out of the macro average"}
    )
    template: str = field(default="{}", metadata={"help": "prompt for COCO class names, e.g. 'a photo of a {}.'"})
    device: str | None = field(default=None, metadata={"help": "default: cuda when available, else cpu"})
    no_progress: bool = field(default=False, metadata={"help": "hide the progress bars"})

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"--benchmark must be one of {', '.join(BENCHMARKS)}, got {self.benchmark!r}")
        if self.region_mode not in (None, "model", "crop"):
            raise ValueError(f"--region_mode must be model or crop, got {self.region_mode!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"--max_samples must be at least 1, got {self.max_samples}")


def load_scorer(model_dir, device: str | None = None, batch_size: int = 32, progress: bool = False) -> ImageTextScorer:
    """An `ImageTextScorer` for the model and processor saved in `model_dir` (CLIP, OC-CLIP or CLOC)."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    import modeling_cloc  # noqa: F401  (registers the model types)
    import modeling_occlip  # noqa: F401

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model_dir {folder}: no config.json; expected a folder written by save_pretrained")
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"--model_dir {folder}: model type {model_type!r} is not clip, occlip or cloc")
    try:
        processor = AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--model_dir {folder}: no processor could be loaded ({error}); save one with processor.save_pretrained"
        ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModel.from_pretrained(folder).to(device)
    return ImageTextScorer(model, processor, FAMILIES[model_type], batch_size=batch_size, progress=progress)


def _existing(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{what} {path}: no such file or folder")
    return path


def run(args: EvaluateArguments) -> dict:
    """The metrics of `args.benchmark` as a JSON-ready dict (also written to the output file)."""
    data_dir = _existing(args.data_dir, "--data_dir")
    # The scorer's own bars cover the synthetic split; the other benchmarks show one bar over their batches.
    scorer = load_scorer(
        args.model_dir, args.device, args.batch_size, args.benchmark == "synthetic" and not args.no_progress
    )
    progress, limit = not args.no_progress, args.max_samples
    default_region_mode = "model" if scorer.model_family.has_regions else "crop"
    inputs = {"data_dir": str(data_dir)}
    if args.benchmark == "synthetic":
        mode = args.region_mode or ("model" if scorer.model_family.has_regions else None)
        metrics = evaluate_synthetic(scorer, data_dir, region_mode=mode)
    elif args.benchmark == "sugarcrepe":
        image_dir = _existing(args.image_dir or data_dir / "images", "--image_dir")
        inputs["image_dir"] = str(image_dir)
        categories = pb.load_sugarcrepe(data_dir, image_dir)
        metrics = {
            name: pb.evaluate_pairwise(scorer, samples[:limit], args.batch_size, progress)
            for name, samples in categories.items()
        }
        metrics["mean"] = sum(metrics.values()) / len(metrics)
    elif args.benchmark == "aro":
        image_dir = _existing(args.image_dir or data_dir / "images", "--image_dir")
        inputs["image_dir"] = str(image_dir)
        files = {
            "vg_relation": data_dir / "visual_genome_relation.json",
            "vg_attribution": data_dir / "visual_genome_attribution.json",
        }
        found = {name: path for name, path in files.items() if path.is_file()}
        if not found:
            raise ValueError(
                f"--data_dir {data_dir}: neither visual_genome_relation.json nor visual_genome_attribution.json"
            )
        metrics = {
            name: pb.evaluate_aro(
                scorer, pb.load_aro(path, image_dir)[:limit], args.batch_size, progress, args.aro_exclude or ()
            )
            for name, path in found.items()
        }
    elif args.benchmark == "winoground":
        metrics = pb.evaluate_winoground(scorer, pb.load_winoground(data_dir)[:limit], progress)
    elif args.benchmark == "coco_regions":
        annotation = _existing(
            args.annotation_file or data_dir / "annotations" / "instances_val2017.json", "--annotation_file"
        )
        image_dir = _existing(args.image_dir or data_dir / "val2017", "--image_dir")
        inputs.update(annotation_file=str(annotation), image_dir=str(image_dir))
        images, classes = pb.load_coco_regions(annotation, image_dir, max_images=limit)
        mode = args.region_mode or default_region_mode
        metrics = pb.evaluate_coco_regions(
            scorer, images, classes, args.template, mode == "crop", max(1, args.batch_size // 4), progress
        )
        metrics["region_mode"] = mode
    else:  # refcoco
        if scorer.family != "cloc":
            raise ValueError(
                f"--benchmark refcoco needs a CLOC model (grounding); {args.model_dir} is {scorer.family}"
            )
        if args.image_dir is None:
            raise ValueError("--benchmark refcoco needs --image_dir (the COCO train2014 images)")
        image_dir = _existing(args.image_dir, "--image_dir")
        refs = pb.find_refs_file(data_dir)
        inputs.update(refs_file=str(refs), image_dir=str(image_dir), split=args.split)
        samples = pb.load_refcoco(
            refs, _existing(data_dir / "instances.json", "instances file"), image_dir, args.split
        )
        metrics = pb.evaluate_refcoco(scorer, samples[:limit], max(1, args.batch_size // 4), progress)
    result = {
        "benchmark": args.benchmark,
        "model_dir": str(args.model_dir),
        "family": scorer.family,
        "inputs": inputs,
        "max_samples": limit,
        "metrics": metrics,
        "arguments": asdict(args),
    }
    output = Path(args.output_file) if args.output_file else Path(args.model_dir) / f"eval_{args.benchmark}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    result["output_file"] = str(output)
    return result


def main(argv: list[str] | None = None) -> int:
    """Console entry point: parse flags, evaluate, print the metrics and where they were written."""
    try:
        (args,) = parse_args(EvaluateArguments, args=argv)
        result = run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result["metrics"], indent=2))
    print(f"wrote {result['output_file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
