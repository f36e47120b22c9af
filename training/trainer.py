"""The Accelerate training loop shared by CLIP, OC-CLIP and CLOC (open_clip's features, `docs/design.md` "Training").

`train(args, family)` builds or loads the model (`--model_config` from scratch, `--init_from` a transformers
CLIP folder), applies the fine-tuning mode (full / frozen towers / LoRA), and runs a loop with the loss over the
global batch (differentiable gathering), cached-feature accumulation, AdamW with no decay on 1-D parameters and
logit scales, a cosine schedule with warmup, logit-scale clamping, gradient clipping, resumable checkpoints under
`OUT/checkpoints/`, and a final `save_pretrained` of model + processor + model card at `OUT/`.
"""

import importlib.util
import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from datasets.distributed import split_dataset_by_node
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    get_cosine_schedule_with_warmup,
)

from processing.clip_tokenizer import bundled_clip_tokenizer
from processing.files import folder_overlap

from .checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    latest_complete,
    load_training_state,
    read_json,
    read_training_state,
    save_training_state,
    write_checksums,
)
from .data import (
    SKIPPED_KEY,
    IndexedRows,
    IndexedStream,
    TrainingCollator,
    data_root,
    evaluation_split,
    load_image_text_dataset,
    load_training_data,
    open_image,
)
from .distributed import FeatureGatherer
from .evaluation import ImageTextScorer, evaluate_regions, evaluate_rows
from .families import ModelFamily, get_family
from .model_card import write_model_card
from .objectives import clamp_logit_scale_parameters
from .step import ContrastiveTrainingModule, forward_backward

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
TOWER_PREFIXES = ("text_model.", "vision_model.", "visual_projection.", "text_projection.")
# The options that fix which rows each step sees: a resume with other values would silently train on other batches.
RUN_SHAPE_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "num_processes")


@dataclass
class ContrastiveTrainingArguments:
    """Every option of the training scripts (names as in `docs/data.md`)."""

    output_dir: str = field(metadata={"help": "final model + processor + card; resumable state in checkpoints/"})
    train_data: str | None = field(
        default=None,
        metadata={
            "help": "imagefolder (metadata.jsonl), Parquet file/glob/folder, WebDataset .tar shards, save_to_disk "
            "folder or Hub dataset id"
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "as in run_clip.py: a Hub dataset id or a local save_to_disk folder (instead of --train_data)"
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "configuration of a Hub dataset"})
    dataset_split: str = field(default="train", metadata={"help": "split of a Hub dataset or a saved DatasetDict"})
    image_column: str = field(default="image", metadata={"help": "column holding the images (Image, bytes or paths)"})
    caption_column: str = field(default="caption", metadata={"help": "column holding the captions"})
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON config of the model (from scratch); with --init_from, only the settings of what CLIP lacks "
            "(binding_config, prompter_config, loss options), the towers coming from the checkpoint"
        },
    )
    init_from: str | None = field(default=None, metadata={"help": "folder of a transformers CLIPModel"})
    finetune_mode: str = field(default="full", metadata={"help": "full, frozen (towers frozen) or lora"})
    eval_data: str | None = field(
        default=None, metadata={"help": "dataset evaluated every --eval_steps and at the end (retrieval, negatives)"}
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "split of --eval_data to evaluate (a saved DatasetDict or Hub dataset; default: validation, as in "
            "run_clip.py); without --eval_data, that split of the training data"
        },
    )
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: at the end)"})
    eval_max_samples: int = field(default=1000, metadata={"help": "rows of --eval_data used (the first N)"})
    max_steps: int | None = None
    num_train_epochs: int = 1
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "micro-batches per step, with cached features (all are negatives)"}
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "peak LR (new modules; everything from scratch)"})
    backbone_learning_rate: float | None = field(
        default=None, metadata={"help": "peak LR of the CLIP towers when fine-tuning (default: 0.1 x learning_rate)"}
    )
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    local_loss: bool = field(default=False, metadata={"help": "score local rows against the global batch only"})
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint folder"})
    seed: int = 0
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (as in accelerate)"})
    report_to: str | None = field(
        default=None,
        metadata={"help": "tensorboard, wandb (comma-separated) or all; extras [tensorboard] / [wandb] install them"},
    )
    logging_steps: int = 10
    on_bad_sample: str = field(default="error", metadata={"help": "error or skip (skipped rows are counted)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    max_regions: int | None = field(default=None, metadata={"help": "CLOC: regions kept per image"})
    hard_negatives: bool = field(
        default=False,
        metadata={"help": "CLIP: one hard-negative caption per row from its `negatives` field (NegCLIP baseline)"},
    )
    dataloader_num_workers: int = 0
    streaming: bool = field(default=False, metadata={"help": "stream the dataset (large sets); needs --max_steps"})
    shuffle_buffer_size: int = 1000
    push_to_hub: bool = False
    hub_model_id: str | None = None
    gradient_checkpointing: bool = False
    disable_tqdm: bool = field(
        default=False,
        metadata={"help": "no progress bar: print a line per logged step (step, loss, LR, samples/s) instead"},
    )


class TrainingProgress:
    """Steps and epochs done and rows skipped, saved with every checkpoint (as JSON, `training.checkpoint`)."""

    def __init__(self):
        self.step, self.epoch, self.batches_in_epoch, self.skipped = 0, 0, 0, 0

    def state_dict(self) -> dict:
        """Counters as a dict."""
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        """Counters from `state_dict` (each a non-negative int, else `CheckpointError`)."""
        names = ("step", "epoch", "batches_in_epoch", "skipped")
        if not isinstance(state, dict) or any(
            not isinstance(state.get(n), int) or isinstance(state.get(n), bool) or state[n] < 0 for n in names
        ):
            raise CheckpointError(f"malformed progress counters {state!r}: expected non-negative ints {names}")
        vars(self).update({n: state[n] for n in names})


def default_processor(family: "str | ModelFamily", image_size: int):
    """The family's processor with the bundled CLIP tokenizer and a CLIP image processor at `image_size`."""
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return get_family(family).processor_class(image_processor=image_processor, tokenizer=bundled_clip_tokenizer())


TOWER_SETTINGS = ("text_config", "vision_config", "projection_dim")
# What a saved sub-config carries besides the tower's settings: an OC-CLIP or CLOC config.json repeats the towers
# under its own model types, which must not count as contradicting a CLIP checkpoint's.
CONFIG_BOOKKEEPING = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype")


def new_module_settings(values: dict, clip_config, model_config_path, init_from) -> dict:
    """The `--model_config` values for the modules CLIP lacks, when fine-tuning from the CLIP at `init_from`.

    Tower settings (`text_config`, `vision_config`, `projection_dim`) may be repeated as the checkpoint has them;
    a value that contradicts the checkpoint is a `ValueError` naming it, since the towers come from there.
    """
    contradictions = []
    for key in TOWER_SETTINGS:
        if key not in values:
            continue
        given, saved = values[key], getattr(clip_config, key)
        if isinstance(given, dict):
            saved = saved.to_dict()
            contradictions += [
                f"{key}.{name} {value!r} (checkpoint: {saved.get(name)!r})"
                for name, value in given.items()
                if name not in CONFIG_BOOKKEEPING and saved.get(name) != value
            ]
        elif given != saved:
            contradictions.append(f"{key} {given!r} (checkpoint: {saved!r})")
    if contradictions:
        raise ValueError(
            f"--model_config {model_config_path} contradicts the CLIP towers of --init_from {init_from}: "
            f"{', '.join(contradictions)}; with --init_from, --model_config sets only what CLIP lacks (binding, "
            "prompter, loss options), the towers coming from the checkpoint"
        )
    return {key: value for key, value in values.items() if key not in TOWER_SETTINGS}


def check_tokenizer_fits(tokenizer, text_config) -> None:
    """`ValueError` unless every token id of `tokenizer` lies in the text tower's vocabulary and both agree on the
    end-of-text token the tower pools at. Checked once per run: the training batches then skip the models'
    per-batch token checks (`ContrastiveTrainingModule(trusted_inputs=True)`)."""
    if len(tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, more than the text tower's vocab_size "
            f"({text_config.vocab_size}); save the model's own tokenizer next to it, or set text_config.vocab_size"
        )
    eos = text_config.eos_token_id
    # eos_token_id == 2 is the legacy value of early CLIP configs: the tower then pools at the highest id instead.
    if eos != 2 and tokenizer.eos_token_id != eos:
        raise ValueError(
            f"the tokenizer's end-of-text token is {tokenizer.eos_token_id}, the text tower pools at {eos} "
            "(text_config.eos_token_id)"
        )


def build_model_and_processor(args: "ContrastiveTrainingArguments", family: "str | ModelFamily"):
    """The model (from `--model_config` or `--init_from`) and its processor, the tokenizer checked against the text
    tower (`check_tokenizer_fits`)."""
    model, processor = _model_and_processor(args, family)
    check_tokenizer_fits(processor.tokenizer, model.config.text_config)
    return model, processor


def _model_and_processor(args: "ContrastiveTrainingArguments", family: "str | ModelFamily"):
    family = get_family(family)
    if args.model_config is None and args.init_from is None:
        raise ValueError("pass --model_config (train from scratch) or --init_from (a CLIP folder)")
    values = {}
    if args.model_config is not None:
        with open(args.model_config) as handle:
            values = json.load(handle)
        if not isinstance(values, dict):
            raise ValueError(f"--model_config {args.model_config} must hold a JSON object")
    if args.init_from is None:
        config = family.config(values)
        model = family.model_class(config)
        processor = default_processor(family, config.vision_config.image_size)
        return model, processor
    clip_config = CLIPConfig.from_pretrained(args.init_from)
    values = new_module_settings(values, clip_config, args.model_config, args.init_from)
    clip = CLIPModel.from_pretrained(args.init_from)
    model = family.from_clip(clip, values)
    try:
        loaded = CLIPProcessor.from_pretrained(args.init_from)
        processor = family.processor_class(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer)
    except (OSError, ValueError, TypeError):
        processor = default_processor(family, clip.config.vision_config.image_size)
    return model, processor


def _is_new_module(name: str, family: ModelFamily) -> bool:
    return not name.startswith(TOWER_PREFIXES) and name not in family.logit_scale_names


def apply_finetune_mode(model, args: "ContrastiveTrainingArguments", family: ModelFamily):
    """Full (unchanged), frozen towers (only new modules and logit scales train), or LoRA via PEFT."""
    if args.finetune_mode == "full":
        return model
    if args.finetune_mode == "frozen":
        if not any(_is_new_module(n, family) for n, _ in model.named_parameters()):
            raise ValueError(f"--finetune_mode frozen leaves nothing to train in a {family.name} model")
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(_is_new_module(name, family) or name in family.logit_scale_names)
        return model
    if args.finetune_mode == "lora":
        from peft import LoraConfig, get_peft_model

        new_modules = sorted({p.rstrip(".") for p in family.new_module_prefixes if hasattr(model, p.rstrip("."))})
        new_modules = [m for m in new_modules if getattr(model, m) is not None]
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
            modules_to_save=["visual_projection", "text_projection", *new_modules],
        )
        peft_model = get_peft_model(model, config)
        for name in family.logit_scale_names:  # logit scales are parameters, not modules: train them directly
            getattr(peft_model.base_model.model, name).requires_grad_(True)
        return peft_model
    raise ValueError(f"--finetune_mode must be full, frozen or lora, got {args.finetune_mode!r}")


def base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.base_model.model if hasattr(model, "peft_config") else model


def build_optimizer(
    model, args: "ContrastiveTrainingArguments", family: ModelFamily, fine_tuning: bool
) -> torch.optim.AdamW:
    """AdamW: no weight decay on 1-D parameters (biases, norms, embeddings' vectors) and logit scales; towers
    at `backbone_learning_rate` when fine-tuning from CLIP."""
    backbone_lr = args.backbone_learning_rate if args.backbone_learning_rate is not None else args.learning_rate / 10
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        plain = name.replace("base_model.model.", "")
        no_decay = parameter.ndim < 2 or plain.split(".")[-1] in family.logit_scale_names or "norm" in plain
        is_tower = plain.startswith(TOWER_PREFIXES) and "lora_" not in plain and "modules_to_save" not in plain
        lr = backbone_lr if (fine_tuning and is_tower) else args.learning_rate
        key = (lr, 0.0 if no_decay else args.weight_decay)
        groups.setdefault(key, []).append(parameter)
    if not groups:
        raise ValueError("no trainable parameters")
    return torch.optim.AdamW(
        [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
        betas=(args.adam_beta1, args.adam_beta2),
    )


def clamp_logit_scales(model, family: ModelFamily) -> None:
    """Keep every logit scale in [0, ln logit_scale_max] (open_clip; `training.objectives.logit_scale_max`)."""
    clamp_logit_scale_parameters(base_model(model), family.logit_scale_names)


def _latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint under `OUT/checkpoints` (a half-written newer one is passed over, with a
    warning naming it)."""
    found, skipped = latest_complete(output_dir / "checkpoints")
    for reason in skipped:
        print(f"--resume_from_checkpoint latest: passing over an incomplete checkpoint: {reason}")
    return found


def _check_run_shape(checkpoint: Path, saved: dict, current: dict) -> None:
    """Refuse a resume whose batch shape differs from the checkpoint's: its step counter and sampler position
    would then point at other rows, and the result would silently differ from an uninterrupted run."""
    differences = [f"{k} {saved.get(k)} (now {current[k]})" for k in RUN_SHAPE_KEYS if saved.get(k) != current[k]]
    if differences:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it was saved with {', '.join(differences)}; resume with the same "
            "batch size, accumulation and number of processes, or start a new --output_dir"
        )


def _input_paths(args: "ContrastiveTrainingArguments") -> dict[str, Path]:
    """The local folders this run reads from, by flag (a glob or file pattern gives its folder)."""
    found = {}
    for flag in ("train_data", "dataset_name", "eval_data", "init_from"):
        value = getattr(args, flag)
        if value is None:
            continue
        path = Path(value)
        if any(c in value for c in "*?["):  # a glob: the folder before the first wildcard
            path = Path(*[part for part in itertools.takewhile(lambda p: not any(c in p for c in "*?["), path.parts)])
        elif path.is_file():
            path = path.parent
        if path.exists():
            found[flag] = path.resolve()
    return found


def check_output_dir(args: "ContrastiveTrainingArguments") -> None:
    """`ValueError` when `--output_dir` is an input folder, or it and a data folder contain one another: the final
    model card, config and checkpoints would overwrite or be mixed into the inputs (checked before any write)."""
    output = Path(args.output_dir).resolve()
    for flag, path in _input_paths(args).items():
        # A data folder must not even share a tree with the output (new files would join the data, or the data
        # would be uploaded with the model); a CLIP folder is only protected from being overwritten.
        overlap = folder_overlap(output, path)
        if overlap == "is" or (overlap is not None and flag != "init_from"):
            relation = "is inside" if overlap == "inside" else overlap
            raise ValueError(
                f"--output_dir {args.output_dir} {relation} --{flag} {getattr(args, flag)}: the trainer would "
                "write its model, card and checkpoints into its input; choose a separate --output_dir"
            )


def _positive_int(args, name: str, allow_none: bool = False) -> None:
    value = getattr(args, name)
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value!r}")


def validate_arguments(args: "ContrastiveTrainingArguments") -> None:
    """`ValueError` naming the option for values that would train nothing, divide by zero or diverge at once."""
    if (args.train_data is None) == (args.dataset_name is None):
        raise ValueError("pass one of --train_data and --dataset_name (the training data), not both or neither")
    for name in ("max_steps", "checkpointing_steps", "checkpoints_total_limit", "eval_steps"):
        _positive_int(args, name, allow_none=True)  # --max_steps 0 once meant "every epoch"
    for name in ("num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
        _positive_int(args, name)
    for name in ("learning_rate", "backbone_learning_rate"):
        value = getattr(args, name)
        if value is None and name == "backbone_learning_rate":
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"--{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(args.weight_decay) or args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be a finite number >= 0, got {args.weight_decay!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(args, name)!r}")
    if args.max_grad_norm is not None and (not math.isfinite(args.max_grad_norm) or args.max_grad_norm < 0):
        raise ValueError(f"--max_grad_norm must be a finite number >= 0 (0: no clipping), got {args.max_grad_norm!r}")
    if not isinstance(args.warmup_steps, int) or args.warmup_steps < 0:
        raise ValueError(f"--warmup_steps must be an integer >= 0, got {args.warmup_steps!r}")
    if args.on_bad_sample not in ("error", "skip"):
        raise ValueError(f"--on_bad_sample must be 'error' or 'skip', got {args.on_bad_sample!r}")


# Tracker of --report_to -> (module it needs, extra of this package that installs it).
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def requested_trackers(report_to: str | None) -> list[str] | str | None:
    """`--report_to` as accelerate's `log_with` ("all", a list, or None); `ValueError` for an unknown tracker and
    `ImportError` naming the extra for one that is not installed (checked before any training)."""
    if report_to is None or report_to.strip().lower() in ("", "none"):
        return None
    if report_to.strip() == "all":
        return "all"
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(
            f"--report_to {report_to}: unknown tracker(s) {unknown}; choose from {sorted(TRACKERS)} or all"
        )
    for name in names:
        module, extra = TRACKERS[name]
        # accelerate only warns and then logs nothing when the tracker's package is missing.
        if importlib.util.find_spec(module) is None:
            raise ImportError(
                f"--report_to {name}: the {module} package is not installed; "
                f"pip install 'occlip-cloc[{extra}]' (or pip install {module})"
            )
    return names


def check_finite_loss(step: int, loss: torch.Tensor, parts: dict, accelerator: Accelerator | None = None) -> None:
    """`FloatingPointError` naming the step and every loss part when the loss is not finite on any process (all
    processes agree, so none waits on a collective the others left)."""
    values = torch.stack([loss.detach().float(), *(p.detach().float() for p in parts.values())])
    finite = torch.isfinite(values).all().float()
    if accelerator is not None and accelerator.num_processes > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() != 1:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in zip(["loss", *parts], values.tolist()))
        raise FloatingPointError(
            f"step {step}: the loss is not finite on some process ({shown} here); stopping without saving. "
            "Lower --learning_rate or --backbone_learning_rate, or check the data"
        )


def check_finite_weights(model, step: int) -> None:
    """`FloatingPointError` naming the tensors when any weight is not finite (such a model is never saved)."""
    bad = [
        name
        for name, tensor in model.state_dict().items()
        if tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if bad:
        raise FloatingPointError(
            f"step {step}: {len(bad)} weight tensors are not finite ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); refusing to save them"
        )


def _check_resume_config(checkpoint: Path, config: dict) -> None:
    saved_file = checkpoint / CONFIG_FILE
    if not saved_file.is_file():
        raise ValueError(f"{checkpoint} is not a checkpoint of this trainer (no {CONFIG_FILE})")
    saved = read_json(saved_file)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{saved_file}: expected a JSON object")
    ignored = {"transformers_version", "_name_or_path", "architectures", "auto_map", "dtype", "torch_dtype"}
    differences = sorted(k for k in set(saved) | set(config) if k not in ignored and saved.get(k) != config.get(k))
    if differences:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was saved for a different model config (differs in {differences})"
        )


def accelerator_processes() -> int:
    """Number of processes of this launch (from the launcher's environment, before an Accelerator exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class TrainingRun:
    """What the stages of `train` share: the prepared module, optimiser and data, and the run's records."""

    args: ContrastiveTrainingArguments
    family: ModelFamily
    accelerator: Accelerator
    module: ContrastiveTrainingModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    processor: object
    dataset: object
    loader: torch.utils.data.DataLoader
    max_steps: int
    model_config: dict
    run_shape: dict
    evaluation_rows: list[dict] | None = None
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # every logged record (transformers' Trainer log_history)
    evaluated_step: int | None = None  # the final model is evaluated unless the last step already was
    samples: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def output_dir(self) -> Path:
        """`--output_dir`."""
        return Path(self.args.output_dir)

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimisation step over every process and micro-batch."""
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self.accelerator.num_processes


def _check_run(args: ContrastiveTrainingArguments, family: ModelFamily):
    """Every check that needs no model or data, before anything is built or written; returns the trackers."""
    if args.hard_negatives and not family.supports_hard_negatives:
        raise ValueError(
            f"--hard_negatives is the CLIP baseline's option; {family.name} trains without hard negatives"
        )
    validate_arguments(args)
    trackers = requested_trackers(args.report_to)
    check_output_dir(args)  # before anything is written
    if family.needs_equal_batches and args.on_bad_sample == "skip" and accelerator_processes() > 1:
        # The family's gathered loss needs equal batches on every process; a skipped row breaks that.
        raise ValueError(
            f"--on_bad_sample skip is not supported for {family.card.title} with several processes; clean the data"
        )
    if args.mixed_precision == "fp16" and args.gradient_accumulation_steps > 1:
        # Cached-feature accumulation backpropagates feature gradients outside the fp16 loss scaler.
        raise ValueError("--mixed_precision fp16 does not combine with --gradient_accumulation_steps > 1; use bf16")
    if args.streaming and not args.max_steps:
        raise ValueError("--streaming needs --max_steps (a streamed dataset has no length)")
    return trackers


def _make_accelerator(args: ContrastiveTrainingArguments, trackers) -> Accelerator:
    """The run's Accelerator: mixed precision, trackers, seedable sampler, DDP that tolerates unused parameters."""
    return Accelerator(
        # Accelerate sets up gloo for a CPU-only launch only when asked: without `cpu=True` every process of a
        # `torchrun` on CPU would believe it is the only one (no DDP, no gathered loss, racing checkpoint writes).
        cpu=accelerator_processes() > 1 and not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(args.output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def _build_model(args: ContrastiveTrainingArguments, family: ModelFamily):
    """`(model, processor, model config as a dict)`, the fine-tuning mode applied."""
    model, processor = build_model_and_processor(args, family)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = apply_finetune_mode(model, args, family)
    return model, processor, json.loads(base_model(model).config.to_json_string(use_diff=False))


def _training_loader(args: ContrastiveTrainingArguments, family: ModelFamily, processor, accelerator: Accelerator):
    """`(dataset, loader, bad metadata lines skipped at load)` of the training data."""
    source, flag = training_source(args)
    dataset, skipped_at_load = load_training_data(
        source,
        args.dataset_split,
        args.streaming,
        args.on_bad_sample,
        args.image_column,
        args.caption_column,
        config_name=args.dataset_config_name,
        flag=flag,
    )
    root = data_root(source)  # None for a Hub dataset: its rows may then name no file at all
    collator = TrainingCollator(
        processor,
        family,
        args.on_bad_sample,
        args.max_regions,
        args.hard_negatives,
        root=root,
        local_files=root is not None,
    )
    if args.streaming:
        if accelerator.num_processes > 1:
            dataset = split_dataset_by_node(dataset, accelerator.process_index, accelerator.num_processes)
        dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        rows = IndexedStream(dataset)
    else:
        rows = IndexedRows(dataset)
    loader = torch.utils.data.DataLoader(
        rows,
        batch_size=args.per_device_train_batch_size,
        shuffle=not args.streaming,
        drop_last=True,  # the gathered losses assume equal batches on every process
        collate_fn=collator,
        num_workers=args.dataloader_num_workers,
        generator=None if args.streaming else torch.Generator().manual_seed(args.seed),
    )
    return dataset, loader, skipped_at_load


def _count_steps(args: ContrastiveTrainingArguments, dataset, loader, accelerator: Accelerator) -> int:
    """The number of optimisation steps of the run (`ValueError` when the data give no full step)."""
    if args.streaming:
        return args.max_steps
    steps_per_epoch = len(loader) // accelerator.num_processes // args.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(dataset)} rows give no full step of {args.per_device_train_batch_size} x "
            f"{args.gradient_accumulation_steps} x {accelerator.num_processes} rows"
        )
    return args.max_steps or steps_per_epoch * args.num_train_epochs


def _prepare_run(args: ContrastiveTrainingArguments, family: ModelFamily, trackers) -> TrainingRun:
    """Accelerator, model, data, optimiser and schedule, all prepared for the loop."""
    accelerator = _make_accelerator(args, trackers)
    set_seed(args.seed)
    model, processor, model_config = _build_model(args, family)
    dataset, loader, skipped_at_load = _training_loader(args, family, processor, accelerator)
    evaluation_rows = None
    # Without --eval_data, --eval_split names a split of the training data.
    eval_source = (
        args.eval_data
        if args.eval_data is not None
        else training_source(args)[0]
        if args.eval_split is not None
        else None
    )
    if eval_source is not None:  # read (and checked) before training, not at the first evaluation
        evaluation_rows = load_evaluation_rows(
            eval_source, args.eval_max_samples, args.image_column, args.caption_column, args.eval_split
        )
    max_steps = _count_steps(args, dataset, loader, accelerator)
    optimizer = build_optimizer(model, args, family, fine_tuning=args.init_from is not None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, max_steps)
    # Constructed on every process at the same point: the gatherer may create a process group collectively.
    # Every batch comes from `TrainingCollator`, i.e. the family's processor, whose tokenizer was checked against
    # the model above: the model may skip its per-batch input checks and their host syncs.
    module = ContrastiveTrainingModule(
        model, family.objective(args.hard_negatives), FeatureGatherer(), args.local_loss, trusted_inputs=True
    )
    if args.streaming:  # each process reads its own split of the stream; batches are moved to the device here
        module, optimizer = accelerator.prepare(module, optimizer)
    else:
        module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    # The scheduler stays out of `prepare` (which would step it once per process); it is saved with the progress
    # counters as JSON (`training.checkpoint`: resume reads no pickle).
    run = TrainingRun(
        args=args,
        family=family,
        accelerator=accelerator,
        module=module,
        optimizer=optimizer,
        scheduler=scheduler,
        processor=processor,
        dataset=dataset,
        loader=loader,
        max_steps=max_steps,
        model_config=model_config,
        run_shape={
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": accelerator.num_processes,
        },
        evaluation_rows=evaluation_rows,
    )
    if args.resume_from_checkpoint:
        _resume(run)
    elif accelerator.is_main_process:  # every process reads all of metadata.jsonl: count its bad lines once
        run.progress.skipped += skipped_at_load
    return run


def _resume(run: TrainingRun) -> None:
    """Model, optimiser, schedule and progress from `--resume_from_checkpoint` (checked against this run)."""
    args = run.args
    checkpoint = (
        _latest_checkpoint(run.output_dir)
        if args.resume_from_checkpoint == "latest"
        else Path(args.resume_from_checkpoint)
    )
    if checkpoint is None or not checkpoint.is_dir():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no checkpoint found")
    state = read_training_state(checkpoint)  # refuses incomplete and pickled (older) checkpoints
    _check_resume_config(checkpoint, run.model_config)
    _check_run_shape(checkpoint, state.get("run_shape") or {}, run.run_shape)
    load_training_state(run.accelerator, checkpoint, run.module, run.optimizer)
    try:
        run.scheduler.load_state_dict(state["scheduler"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{checkpoint}: malformed scheduler state ({error})") from None
    run.progress.load_state_dict(state.get("progress"))  # its count already holds the bad metadata lines


def _init_trackers(run: TrainingRun) -> None:
    """Start `--report_to`'s trackers with the run's options as hyperparameters (main process)."""
    if run.accelerator.is_main_process:
        # TensorBoard's hparams take only scalars and strings: a list option (--lora_target_modules) is joined.
        config = {
            k: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            for k, v in asdict(run.args).items()
            if v is not None
        }
        run.accelerator.init_trackers("training", config=config)


def _train_step(run: TrainingRun, micro: list[dict]) -> tuple[torch.Tensor, dict]:
    """Forward, backward and optimiser step on one step's micro-batches; returns the loss and its parts."""
    accelerator, progress = run.accelerator, run.progress
    progress.batches_in_epoch += len(micro)
    # Counted per trained batch (not in the collator): workers and read-ahead would miscount.
    progress.skipped += int(sum(batch.pop(SKIPPED_KEY).sum() for batch in micro))
    run.module.train()
    loss, parts = forward_backward(run.module, micro, accelerator.backward, accelerator.no_sync, accelerator.autocast)
    check_finite_loss(progress.step + 1, loss, parts, accelerator)
    if run.args.max_grad_norm:
        accelerator.clip_grad_norm_(run.module.parameters(), run.args.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    clamp_logit_scales(accelerator.unwrap_model(run.module).model, run.family)
    progress.step += 1
    run.samples += run.rows_per_step
    return loss, parts


def _log_step(run: TrainingRun, loss: torch.Tensor, parts: dict, bar) -> None:
    """Every `--logging_steps` and at the last step: the process-averaged losses, LR and throughput to the
    trackers, the history, and the progress bar (or, with `--disable_tqdm`, a line on stdout)."""
    step = run.progress.step
    if step % run.args.logging_steps and step != run.max_steps:
        return
    reduced = run.accelerator.reduce(torch.stack([loss, *parts.values()]), reduction="mean").tolist()
    metrics = dict(zip(["loss", *parts], reduced))
    metrics["lr"] = run.scheduler.get_last_lr()[0]
    metrics["samples_per_second"] = run.samples / (time.perf_counter() - run.started)
    run.metrics = metrics
    run.accelerator.log(metrics, step=step)
    run.history.append({"step": step, **metrics})
    shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
    shown["sps"] = f"{metrics['samples_per_second']:.1f}"
    if bar.disable:
        if run.accelerator.is_main_process:  # a log file gets progress lines instead of a bar
            print(
                f"step {step}/{run.max_steps}: loss {shown['loss']}, lr {shown['lr']}, samples/s {shown['sps']}",
                flush=True,
            )
    else:
        bar.set_postfix(**shown)


def _after_step(run: TrainingRun) -> None:
    """Periodic evaluation and checkpoint, when their step comes."""
    args, step = run.args, run.progress.step
    if run.evaluation_rows is not None and args.eval_steps and step % args.eval_steps == 0:
        _evaluate(run)
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        state = {"progress": run.progress.state_dict(), "scheduler": run.scheduler.state_dict()}
        state["run_shape"] = run.run_shape
        check_finite_weights(run.accelerator.unwrap_model(run.module), step)
        save_checkpoint(
            run.accelerator,
            run.module,
            run.optimizer,
            run.output_dir,
            step,
            state,
            run.model_config,
            args.checkpoints_total_limit,
        )


def _evaluate(run: TrainingRun) -> None:
    """Evaluate the model at this step on `--eval_data` and record the metrics."""
    step = run.progress.step
    evaluated = run_evaluation(run.accelerator, run.module, run.processor, run.family, run.evaluation_rows, step)
    run.metrics.update(evaluated)
    run.history.append({"step": step, **evaluated})
    run.evaluated_step = step


def _train_loop(run: TrainingRun) -> None:
    """Epochs of steps until `max_steps`, resuming inside an epoch where a checkpoint left off."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    bar = tqdm(
        total=run.max_steps,
        initial=progress.step,
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
        desc=f"train {run.family.name}",
    )
    while progress.step < run.max_steps:
        batches = _epoch_batches(accelerator, run.loader, run.dataset, args.streaming, progress)
        steps_this_epoch = 0
        while progress.step < run.max_steps:
            micro = _next_micro_batches(accelerator, batches, args.gradient_accumulation_steps)
            if micro is None:  # this epoch has no full step left on some process
                if steps_this_epoch == 0 and progress.batches_in_epoch == 0:
                    raise ValueError("the dataset gives no full step on every process: lower the batch size")
                break
            steps_this_epoch += 1
            loss, parts = _train_step(run, micro)
            _log_step(run, loss, parts, bar)
            bar.update(1)
            _after_step(run)
        else:
            break
        progress.epoch += 1
        progress.batches_in_epoch = 0
    bar.close()


def _finish(run: TrainingRun) -> dict:
    """Final evaluation, skipped-row count, and (main process) the saved model, processor, card and history."""
    accelerator, progress = run.accelerator, run.progress
    if run.evaluation_rows is not None and run.evaluated_step != progress.step:
        _evaluate(run)
    skipped = torch.tensor(float(progress.skipped), device=accelerator.device)
    run.metrics["skipped_rows"] = int(accelerator.reduce(skipped, reduction="sum").item())
    if run.metrics["skipped_rows"] and accelerator.is_main_process:
        print(f"skipped {run.metrics['skipped_rows']} bad rows (--on_bad_sample skip)")
    accelerator.wait_for_everyone()
    check_finite_weights(accelerator.unwrap_model(run.module), progress.step)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.module).model
        save_final(model, run.processor, run.output_dir, run.args, run.family, run.metrics)
        # Records of this run (after a resume: from the resumed step on).
        (run.output_dir / "log_history.json").write_text(json.dumps(run.history, indent=1))
        if run.args.push_to_hub:
            push_to_hub(run.output_dir, run.args.hub_model_id or run.output_dir.name)
    accelerator.end_training()
    return run.metrics


def train(args: ContrastiveTrainingArguments, family: "str | ModelFamily") -> dict:
    """Train a `family` model (`clip`, `occlip`, `cloc` or a `ModelFamily`) as `args` says; returns the final
    metrics."""
    family = get_family(family)
    trackers = _check_run(args, family)
    run = _prepare_run(args, family, trackers)
    _init_trackers(run)
    _train_loop(run)
    return _finish(run)


def training_source(args: ContrastiveTrainingArguments) -> tuple[str, str]:
    """The training data's location and the flag that gave it (`--train_data` or `--dataset_name`)."""
    if args.dataset_name is not None:
        return args.dataset_name, "--dataset_name"
    return args.train_data, "--train_data"


def load_evaluation_rows(
    path: str, max_samples: int, image_column: str = "image", caption_column: str = "caption", split: str | None = None
) -> list[dict]:
    """The first `max_samples` rows of `--eval_data` (its `--eval_split`, `training.data.evaluation_split`), images
    opened (a bad row is an error naming it)."""
    split = evaluation_split(path, split)
    dataset = load_image_text_dataset(
        path, split, image_column=image_column, caption_column=caption_column, flag="--eval_data"
    )
    rows = list(itertools.islice(iter(dataset), max_samples))
    root = data_root(path)
    if not rows:
        raise ValueError(f"--eval_data {path}: no rows")
    for index, row in enumerate(rows):
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"--eval_data {path}: row {index} has an empty caption")
        row["image"] = open_image(row, f"--eval_data {path}: row {index}", root, local_files=root is not None)
    return rows


def run_evaluation(
    accelerator: Accelerator, module, processor, family: "str | ModelFamily", rows: list[dict], step: int
) -> dict:
    """`training.evaluation.evaluate_rows` on the main process (others wait), logged as `eval/<metric>`."""
    results = {}
    if accelerator.is_main_process:
        model = base_model(accelerator.unwrap_model(module).model)
        scorer = ImageTextScorer(model, processor, family)  # puts the model in eval mode
        images = [r["image"] for r in rows]
        values = evaluate_rows(scorer, rows, images)
        region_rows = [r for r in rows if r.get("regions")]
        if get_family(family).has_regions and region_rows:  # classes: the region texts of the evaluation rows
            classes = sorted({region["text"] for r in region_rows for region in r["regions"]})
            values.update(evaluate_regions(scorer, region_rows, [r["image"] for r in region_rows], classes))
        results = {f"eval/{k}": v for k, v in values.items()}
        model.train()
        accelerator.log(results, step=step)
        print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    accelerator.wait_for_everyone()
    return results


def _epoch_batches(accelerator: Accelerator, loader, dataset, streaming: bool, progress: TrainingProgress):
    """Batches of the current epoch after the ones already trained on (resume)."""
    if streaming:
        dataset.set_epoch(progress.epoch)
        batches = itertools.islice(iter(loader), progress.batches_in_epoch, None)
        return ({k: v.to(accelerator.device) for k, v in batch.items()} for batch in batches)
    loader.set_epoch(progress.epoch)
    return iter(accelerator.skip_first_batches(loader, progress.batches_in_epoch))


def _next_micro_batches(accelerator: Accelerator, batches, count: int) -> list | None:
    """The next `count` batches, or None when any process has run out (all processes agree)."""
    micro = list(itertools.islice(batches, count))
    complete = torch.tensor(float(len(micro) == count), device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(complete, op=torch.distributed.ReduceOp.MIN)
    return micro if complete.item() == 1 else None


def save_checkpoint(
    accelerator: Accelerator,
    module,
    optimizer,
    output_dir: Path,
    step: int,
    state: dict,
    model_config: dict,
    total_limit: int | None = None,
) -> Path:
    """The resumable state at `OUT/checkpoints/checkpoint_<step>`, written atomically without pickle
    (`training.checkpoint.save_training_state`) with the model config (checked on resume); keeps the newest
    `total_limit` checkpoints.

    Named by step rather than by accelerate's automatic counter, whose existence check before its barrier races
    between processes.
    """
    folder = output_dir / "checkpoints" / f"checkpoint_{step}"
    return save_training_state(accelerator, folder, module, optimizer, state, model_config, total_limit)


def save_final(
    model, processor, output_dir: Path, args: ContrastiveTrainingArguments, family: ModelFamily, metrics: dict
) -> None:
    """Model (LoRA merged; the adapter also under `adapter/`), processor and model card at `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(output_dir / "adapter")
        add_directly_trained_parameters(model, output_dir / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    write_model_card(output_dir, model, family, args, metrics)
    # safetensors has no checksum: a `<file>.sha256` (sha256sum format) lets a user detect flipped bytes.
    write_checksums(output_dir)
    if (output_dir / "adapter").is_dir():
        write_checksums(output_dir / "adapter")


def add_directly_trained_parameters(peft_model, adapter_folder: Path) -> list[str]:
    """Add the parameters trained outside LoRA and `modules_to_save` (the logit scales) to the adapter's
    safetensors file; returns their names."""
    from safetensors.torch import load_file, save_file

    # PEFT saves only LoRA weights and whole saved modules, and a logit scale is a bare parameter of the root model.
    # Without it base + adapter misses the trained temperature. The keys keep PeftModel's names
    # (`base_model.model.logit_scale`), which `PeftModel.from_pretrained` loads into the base model.
    extra = {
        name: parameter.detach().cpu().contiguous()
        for name, parameter in peft_model.named_parameters()
        if parameter.requires_grad and "lora_" not in name and ".modules_to_save." not in name
    }
    if extra:
        path = adapter_folder / "adapter_model.safetensors"
        weights = load_file(path)
        weights.update(extra)
        save_file(weights, path, metadata={"format": "pt"})
    return sorted(extra)


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload the final folder (not the resumable checkpoints) with `huggingface_hub`; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), ignore_patterns=["checkpoints/*"])
    return str(commit)
