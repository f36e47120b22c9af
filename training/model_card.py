"""A model card (`README.md` with Hub metadata) for a trained folder, built with `huggingface_hub.ModelCard`:
what it is, how it was trained, its metrics (evaluations as card-metadata `EvalResult`s), and how to load it."""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData


@dataclass(frozen=True)
class ModelCardInfo:
    """What a family's model card says about it (`training.families.ModelFamily.card`).

    Attributes:
        title: the model's name in the card's title ("OC-CLIP").
        description: what the folder holds, as "a ... model: ..." (one sentence part).
        tags: Hub tags.
        pipeline_tag: the transformers pipeline the folder runs in, or None (only what works).
        usage: Python run after loading `model`, `processor` and `image`, on any image.
        remote_code: whether the folder's classes come from this package (else transformers has them).
    """

    title: str
    description: str
    tags: tuple[str, ...]
    pipeline_tag: str | None
    usage: str
    remote_code: bool = True


# The license of this package's code, used for models trained from scratch with it.
SCRATCH_LICENSE = "apache-2.0"
PLACEHOLDER = "PATH_OR_REPO"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_id(value: str | None, kind: str = "models") -> str | None:
    """The Hub repository id behind `value`: an `owner/name` that is not a local path, or a folder inside the Hub
    cache (`models--owner--name/...`); None for other local paths."""
    if not value:
        return None
    path = Path(value)
    if path.exists():
        for part in path.resolve().parts:
            if part.startswith(f"{kind}--"):
                return "/".join(part.split("--")[1:])
        return None
    return value if HUB_ID.fullmatch(value) else None


def base_license(init_from: str | None) -> str:
    """The license of the starting checkpoint's own card, `SCRATCH_LICENSE` from scratch, else "unknown"."""
    if init_from is None:
        return SCRATCH_LICENSE
    card = Path(init_from) / "README.md"
    if card.is_file():
        license_id = ModelCard.load(card).data.license
        if license_id:
            return license_id
    return "unknown"


def eval_task(metric: str) -> tuple[str, str]:
    """(task type, task name) of an `eval/<metric>` of `training.evaluation`."""
    if "_R@" in metric:
        return "image-text-retrieval", "Image-text retrieval"
    if metric == "region_classification":
        return "region-classification", "Region classification"
    if metric.startswith("grounding"):
        return "visual-grounding", "Visual grounding"
    return "image-text-matching", "Image-text matching against hard negatives"


def evaluated_data(args) -> str | None:
    """What the run evaluated on: `--eval_data`, or the training data when only `--eval_split` was given."""
    if args.eval_data is not None or args.eval_split is None:
        return args.eval_data
    return args.dataset_name if args.dataset_name is not None else args.train_data


def eval_results(metrics: dict, eval_data: str | None, split: str | None = None) -> list[EvalResult] | None:
    """The `eval/<metric>` values as card-metadata results on `--eval_data` (its `--eval_split`, when one was
    named)."""
    values = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
    if not values or eval_data is None:
        return None
    dataset = hub_id(eval_data, "datasets") or Path(eval_data).name
    results = []
    for metric, value in values.items():
        task_type, task_name = eval_task(metric)
        results.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=metric,
                metric_name=metric,
                metric_value=float(value),
            )
        )
    return results


def _card_info(family) -> ModelCardInfo:
    from .families import get_family  # here: the families import this module for `ModelCardInfo`

    return get_family(family).card


def load_snippet(family) -> str:
    """Python that loads the folder at `PLACEHOLDER` and runs it on an image (`family`: a `ModelFamily` or its
    name)."""
    card = _card_info(family)
    imports = (
        "import modeling_cloc, modeling_occlip, processing  # pip install occlip-cloc: registers the classes\n"
        if card.remote_code
        else ""
    ) + "import torch\nfrom PIL import Image\nfrom transformers import AutoModel, AutoProcessor\n\n"
    return (
        imports + f'model = AutoModel.from_pretrained("{PLACEHOLDER}").eval()\n'
        f'processor = AutoProcessor.from_pretrained("{PLACEHOLDER}")\n'
        'image = Image.new("RGB", (64, 48), "red")  # or Image.open("your.jpg")\n' + card.usage
    )


def _fence(code: str, language: str = "python") -> str:
    return f"```{language}\n{code.strip()}\n```"


def build_model_card(model, family, args, metrics: dict) -> ModelCard:
    """The card of a trained `family` model (a `ModelFamily` or its name): metadata (`ModelCardData`) and a body
    with a load snippet."""
    card = _card_info(family)
    options = {k: v for k, v in asdict(args).items() if v is not None and k not in ("push_to_hub", "hub_model_id")}
    datasets = [d for d in (hub_id(getattr(args, "dataset_name", None), "datasets"),) if d]
    datasets = datasets or [d for d in (hub_id(args.train_data, "datasets"),) if d]
    tags = list(card.tags) + (["lora"] if args.finetune_mode == "lora" else [])
    data = ModelCardData(
        library_name="transformers",
        license=base_license(args.init_from),
        base_model=hub_id(args.init_from),
        datasets=datasets or None,
        tags=tags,
        pipeline_tag=card.pipeline_tag,
        model_name=f"{card.title} ({Path(args.output_dir).name})",
        eval_results=eval_results(metrics, evaluated_data(args), args.eval_split),
    )
    parameters = sum(p.numel() for p in model.parameters())
    start = f"a transformers CLIP checkpoint (`{args.init_from}`)" if args.init_from else "scratch"
    metric_rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    remote = (
        ""
        if not card.remote_code
        else "\nWithout the package, pass `trust_remote_code=True` to both `from_pretrained` calls (the folder holds "
        "the model and processor code).\n"
    )
    body = f"""
# {card.title} model

This folder holds {card.description}, with {parameters / 1e6:.1f} M parameters. It was trained from {start}
with fine-tuning mode `{args.finetune_mode}` on `{args.train_data or args.dataset_name}`.

## How to load

{_fence(load_snippet(family))}
{remote}
## Training options

{_fence(json.dumps(options, indent=2, sort_keys=True, default=str), "json")}

## Final metrics (training)

| metric | value |
|---|---|
{metric_rows}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(folder: Path, model, family, args, metrics: dict) -> Path:
    """Write `folder/README.md`; returns its path."""
    path = Path(folder) / "README.md"
    build_model_card(model, family, args, metrics).save(path)
    return path
