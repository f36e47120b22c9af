"""A model card (`README.md` with Hub metadata) for a trained folder: what it is, how it was trained, its
final metrics, and how to load it."""

import json
from dataclasses import asdict
from pathlib import Path

DESCRIPTIONS = {
    "clip": "a CLIP model (transformers `CLIPModel`)",
    "occlip": "an OC-CLIP model: CLIP towers, a binding module that gives one visual slot per scene-graph node, "
    "and a structured object + relation similarity",
    "cloc": "a CLOC model: CLIP towers plus a Prompter that turns image tokens and a box or region caption into a "
    "region embedding, and a box head for grounding",
}
PACKAGE_IMPORT = {"clip": None, "occlip": "modeling_occlip", "cloc": "modeling_cloc"}


def _fence(code: str, language: str = "python") -> str:
    return f"```{language}\n{code.strip()}\n```"


def write_model_card(folder: Path, model, family: str, args, metrics: dict) -> Path:
    """Write `folder/README.md`; returns its path."""
    folder = Path(folder)
    options = {k: v for k, v in asdict(args).items() if v is not None and k not in ("push_to_hub", "hub_model_id")}
    parameters = sum(p.numel() for p in model.parameters())
    package = PACKAGE_IMPORT[family]
    load = (
        f"import {package}  # registers the model (or pass trust_remote_code=True without the package)\n"
        if package
        else ""
    ) + (
        "from transformers import AutoModel, AutoProcessor\n\n"
        'model = AutoModel.from_pretrained("PATH_OR_REPO")\n'
        'processor = AutoProcessor.from_pretrained("PATH_OR_REPO")'
    )
    metric_rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    start = "a transformers CLIP checkpoint (`" + str(args.init_from) + "`)" if args.init_from else "scratch"
    text = f"""---
library_name: transformers
tags:
- {family}
- clip
- zero-shot-image-classification
pipeline_tag: zero-shot-image-classification
---

# {family.upper() if family != "occlip" else "OC-CLIP"} model

This folder holds {DESCRIPTIONS[family]}, with {parameters / 1e6:.1f} M parameters. It was trained from {start}
with fine-tuning mode `{args.finetune_mode}` on `{args.train_data or args.dataset_name}`.

## How to load

{_fence(load)}

## Training options

{_fence(json.dumps(options, indent=2, sort_keys=True, default=str), "json")}

## Final metrics (training)

| metric | value |
|---|---|
{metric_rows}
"""
    path = folder / "README.md"
    path.write_text(text)
    return path
