"""VESL: region-text pseudo-labels for CLOC training data (`docs/cloc.md`, "VESL pipeline"; format `docs/data.md`).

Per image: (1) optionally re-caption with any transformers image-to-text model, keeping the original text as
`alt_text`; (2) region phrase candidates from the caption (noun phrases) or, as the paper's baseline, alt-text
n-grams; (3) OWLv2 open-vocabulary detection with those phrases as queries: a box is kept when its best phrase
scores above the threshold (0.1) and is captioned with that phrase, then class-agnostic NMS (IoU 0.5, optional)
and at most 32 boxes, scores stored; (4) rows written in the format the CLOC trainer reads, with statistics.

Scale (reading and writing shards: `processing/vesl_data.py`): process `p` of `P` takes input shards
`i % P == p` (Accelerate `PartialState`); each output shard appears atomically, and a rerun with the same options
skips the finished ones; every shard records the settings it was made with, and a rerun under other settings is
refused. Unreadable images are counted and skipped, never fatal; so are rows whose image path lies outside the input
folder or names something other than a regular file under `MAX_IMAGE_BYTES`, and rows whose text is too long or not
UTF-8 (counted as `refused_files` and `bad_captions`, the first few named in the log), or, with
`--on_bad_sample error`, an error naming the first such row and its path. An `--output_dir` that is,
contains or lies inside the input is refused before anything is written.
"""

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .boxes import box_problem
from .region_phrases import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_NGRAMS,
    DEFAULT_MAX_PHRASES,
    alt_text_ngrams,
    extract_region_phrases_batch,
)
from .rule_parser import caption_preview, caption_problem
from .vesl_data import (
    OUTPUT_FORMATS,
    InputShard,
    RefusedFile,
    ShardWriter,
    SourceRow,
    VeslStats,
    check_committed_shards,
    check_output_apart,
    finalize_output,
    list_input_shards,
    open_source_image,
    shard_is_done,
    write_atomically,
)

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "google/owlv2-large-patch14-finetuned"
PHRASE_SOURCES = ("caption", "alt_text_ngrams")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CONFIG_FILE = "vesl_config.json"
_MAX_LOGGED_BAD_IMAGES = 5  # per shard; the rest are only counted


# --------------------------------------------------------------------------------------------- boxes and scores


def padded_square_boxes_to_pixels(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """OWLv2 boxes `[N, 4]` (cx, cy, w, h in [0, 1] of the bottom/right-padded square) -> xyxy original pixels.

    OWLv2 pads an image to a `max(width, height)` square before resizing, so both axes scale by the long side;
    boxes are then clipped to the image (a box reaching into the padding is cut at the image border).
    """
    side = float(max(width, height))
    cx, cy, w, h = boxes.float().unbind(-1)
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1) * side
    limits = torch.tensor([width, height, width, height], dtype=corners.dtype)
    return torch.minimum(corners.clamp(min=0), limits)


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes `[..., 4]`, broadcast over the leading dims (`box_iou(a[:, None], b[None])` is pairwise);
    0 where a union is empty."""
    lo = torch.maximum(first[..., :2], second[..., :2])
    hi = torch.minimum(first[..., 2:], second[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = lambda b: (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(first) + area(second) - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy class-agnostic non-maximum suppression; indices of the kept boxes, best score first.

    A box is suppressed when its IoU with a kept, higher-scoring box exceeds `iou_threshold`; ties in score keep
    the earlier box (stable sort), so the result is deterministic.
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    iou = box_iou(boxes[order, None], boxes[None, order])
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    kept = []
    for rank in range(len(order)):
        if suppressed[rank]:
            continue
        kept.append(rank)
        suppressed |= iou[rank] > iou_threshold
    return order[torch.tensor(kept, dtype=torch.long)]


def assign_phrases(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per box, the confidence (sigmoid) of its most confident phrase and that phrase's index, from `[N, Q]` logits."""
    scores, labels = torch.sigmoid(logits.float()).max(dim=-1)
    return scores, labels


def above_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Mask of the boxes kept by the confidence threshold (strictly greater, as the paper's "> 0.1")."""
    return scores > threshold


def _rounded(box: torch.Tensor) -> list[float]:
    """A box as written to the rows: pixels to two decimals."""
    return [round(float(v), 2) for v in box]


def select_regions(
    logits: torch.Tensor,
    boxes: torch.Tensor,
    phrases: list[str],
    threshold: float = 0.1,
    nms_iou: float | None = 0.5,
    max_regions: int = 32,
    min_box_size: float = 1.0,
) -> list[dict]:
    """Region rows `{"bbox", "text", "score"}` from one image's detections, best score first.

    `logits` `[N, Q]` score the N boxes against the Q phrases (only the first `len(phrases)` columns are read, so
    padded queries never win); `boxes` `[N, 4]` are xyxy in original pixels. Boxes narrower or lower than
    `min_box_size` pixels (e.g. wholly inside OWLv2's padding) are dropped before NMS.
    """
    if not phrases or len(boxes) == 0:
        return []
    scores, labels = assign_phrases(logits[:, : len(phrases)])
    boxes = boxes.float()
    keep = above_threshold(scores, threshold)
    keep &= (boxes[:, 2] - boxes[:, 0] >= min_box_size) & (boxes[:, 3] - boxes[:, 1] >= min_box_size)
    index = keep.nonzero().flatten()
    # Written rows must pass the loader's box rule (`processing.boxes`): a NaN or degenerate detection stops here.
    index = index[torch.tensor([box_problem(_rounded(boxes[i])) is None for i in index.tolist()], dtype=torch.bool)]
    if nms_iou is not None and len(index):
        index = index[nms(boxes[index], scores[index], nms_iou)]
    else:
        index = index[torch.sort(scores[index], descending=True, stable=True).indices]
    index = index[:max_regions]
    return [
        {
            "bbox": _rounded(boxes[i]),
            "text": phrases[int(labels[i])],
            "score": round(float(scores[i]), 4),
        }
        for i in index.tolist()
    ]


# ------------------------------------------------------------------------------------------------------ models


def _to_device(batch, device, dtype) -> dict:
    return {
        key: value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
        if isinstance(value, torch.Tensor)
    }


def pad_to_square(image: Image.Image, size: int) -> Image.Image:
    """The image padded with black at the bottom/right to a square (OWLv2's layout) and resized to `size`."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (0, 0, 0))
    square.paste(image, (0, 0))
    return square.resize((size, size), Image.Resampling.BILINEAR)


class OwlV2RegionDetector:
    """Open-vocabulary box detection with a transformers `Owlv2ForObjectDetection` + `Owlv2Processor`.

    Images are padded to a square and resized here with PIL (the processor then only rescales and normalises;
    its own resize needs scipy), at `image_size` (default: the model's native size; another size interpolates
    the position embeddings, e.g. the paper's 448). Phrases of all images are queries of one forward pass.
    """

    def __init__(
        self,
        model,
        processor,
        threshold: float = 0.1,
        nms_iou: float | None = 0.5,
        max_regions: int = 32,
        image_size: int | None = None,
    ):
        self.model, self.processor = model.eval(), processor
        self.threshold, self.nms_iou, self.max_regions = threshold, nms_iou, max_regions
        native = model.config.vision_config.image_size
        self.image_size = image_size or native
        self.interpolate = self.image_size != native
        self.max_text_length = model.config.text_config.max_position_embeddings

    @classmethod
    def from_pretrained(cls, name: str, device="cpu", dtype=torch.float32, **kwargs) -> "OwlV2RegionDetector":
        """Load model and processor from a Hub id or folder."""
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        model = Owlv2ForObjectDetection.from_pretrained(name, dtype=dtype).to(device)
        return cls(model, Owlv2Processor.from_pretrained(name), **kwargs)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], phrases: list[list[str]]) -> list[list[dict]]:
        """Region rows per image (boxes in that image's pixels) for the given phrase lists."""
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrase lists")
        results: list[list[dict]] = [[] for _ in images]
        todo = [i for i, p in enumerate(phrases) if p]
        if not todo:
            return results
        num_queries = max(len(phrases[i]) for i in todo)
        queries = [q for i in todo for q in phrases[i] + [" "] * (num_queries - len(phrases[i]))]
        text = self.processor.tokenizer(
            queries, padding="max_length", truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        pixels = self.processor.image_processor(
            [pad_to_square(images[i], self.image_size) for i in todo],
            do_resize=False,
            do_pad=False,
            return_tensors="pt",
        )
        parameter = next(self.model.parameters())
        inputs = _to_device({**text, **pixels}, parameter.device, parameter.dtype)
        outputs = self.model(**inputs, interpolate_pos_encoding=self.interpolate)
        logits, boxes = outputs.logits.float().cpu(), outputs.pred_boxes.float().cpu()
        for row, i in enumerate(todo):
            width, height = images[i].size
            results[i] = select_regions(
                logits[row],
                padded_square_boxes_to_pixels(boxes[row], width, height),
                phrases[i],
                self.threshold,
                self.nms_iou,
                self.max_regions,
            )
        return results


class ImageCaptioner:
    """Captions from any transformers image-to-text model (`AutoModelForImageTextToText` + `AutoProcessor`).

    Greedy decoding by default (deterministic, so a resumed run reproduces its captions). An optional `prompt`
    is passed to the processor with every image; generated text that repeats it is cut off.
    """

    def __init__(self, model, processor, prompt: str | None = None, max_new_tokens: int = 77, num_beams: int = 1):
        self.model, self.processor = model.eval(), processor
        self.prompt, self.max_new_tokens, self.num_beams = prompt, max_new_tokens, num_beams
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and prompt:
            tokenizer.padding_side = "left"  # decoder-only models continue the prompt at the right edge

    @classmethod
    def from_pretrained(
        cls, name: str, device="cpu", dtype=torch.float32, trust_remote_code: bool = False, **kwargs
    ) -> "ImageCaptioner":
        """Load model and processor from a Hub id or folder."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        return cls(model.to(device), processor, **kwargs)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (may be empty if the model emits only special tokens)."""
        if self.prompt:
            inputs = self.processor(images=images, text=[self.prompt] * len(images), padding=True, return_tensors="pt")
        else:
            inputs = self.processor(images=images, return_tensors="pt")
        parameter = next(self.model.parameters())
        inputs = _to_device(inputs, parameter.device, parameter.dtype)
        output = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=False
        )
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and output.shape[1] >= prompt_ids.shape[1]:
            if torch.equal(output[:, : prompt_ids.shape[1]].cpu(), prompt_ids.cpu()):
                output = output[:, prompt_ids.shape[1] :]  # decoder-only models return the prompt first
        captions = self.processor.batch_decode(output, skip_special_tokens=True)
        captions = [" ".join(c.split()) for c in captions]
        if self.prompt:
            captions = [c[len(self.prompt) :].strip() if c.startswith(self.prompt) else c for c in captions]
        return captions


# ------------------------------------------------------------------------------------------------------- runner


@dataclass
class VeslArguments:
    """Every option of `examples/vesl_annotate.py`."""

    input: str = field(
        metadata={"help": "imagefolder, WebDataset .tar shards (folder/glob), Parquet, save_to_disk folder or Hub id"}
    )
    output_dir: str = field(metadata={"help": "where the annotated shards, stats.json and metadata.jsonl go"})
    detector: str = field(default=DEFAULT_DETECTOR, metadata={"help": "OWLv2 Hub id or folder"})
    captioner: str | None = field(
        default=None, metadata={"help": "image-to-text model (Hub id or folder); without it the input caption is used"}
    )
    caption_prompt: str | None = field(default=None, metadata={"help": "text prompt passed with each image"})
    caption_max_new_tokens: int = 77
    caption_num_beams: int = 1
    trust_remote_code: bool = False
    phrase_source: str = field(default="caption", metadata={"help": "caption (noun phrases) or alt_text_ngrams"})
    max_phrases: int = field(default=DEFAULT_MAX_PHRASES, metadata={"help": "noun phrases kept per caption"})
    ngram_max_n: int = field(default=DEFAULT_MAX_N, metadata={"help": "alt_text_ngrams: longest n-gram"})
    max_ngrams: int = field(default=DEFAULT_MAX_NGRAMS, metadata={"help": "alt_text_ngrams: n-grams kept per image"})
    threshold: float = field(default=0.1, metadata={"help": "keep boxes whose best phrase confidence exceeds this"})
    nms_iou: float = field(default=0.5, metadata={"help": "class-agnostic NMS IoU threshold; 1 turns NMS off"})
    max_regions: int = field(default=32, metadata={"help": "boxes kept per image"})
    detector_image_size: int = field(
        default=448, metadata={"help": "OWLv2 input size (the paper's 448); 0 for the model's native size"}
    )
    output_format: str = field(default="imagefolder", metadata={"help": "imagefolder or webdataset"})
    rows_per_shard: int = field(default=1000, metadata={"help": "rows per shard of imagefolder/save_to_disk input"})
    split: str = "train"
    image_column: str = "image"
    text_column: str = field(default="caption", metadata={"help": "the input's caption / alt-text field"})
    batch_size: int = 16
    device: str | None = field(default=None, metadata={"help": "default: this process's accelerator, else cpu"})
    dtype: str = field(default="float32", metadata={"help": "float32, float16 or bfloat16"})
    disable_tqdm: bool = False
    on_bad_sample: str = field(
        default="skip",
        metadata={"help": "skip (bad rows counted, the first few logged) or error (stop at the first, naming it)"},
    )

    def __post_init__(self):
        if self.on_bad_sample not in ("error", "skip"):
            raise ValueError(f"--on_bad_sample must be 'error' or 'skip', got {self.on_bad_sample!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must lie in [0, 1], got {self.threshold}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"--nms_iou must lie in (0, 1] (1 turns NMS off), got {self.nms_iou}")
        if self.phrase_source not in PHRASE_SOURCES:
            raise ValueError(f"--phrase_source must be one of {PHRASE_SOURCES}, got {self.phrase_source!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"--output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        for name in ("max_phrases", "ngram_max_n", "max_ngrams", "max_regions", "rows_per_shard", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.detector_image_size < 0:
            raise ValueError(
                f"--detector_image_size must be positive (0: native size), got {self.detector_image_size}"
            )
        if Path(self.output_dir).is_file():
            raise ValueError(f"--output_dir {self.output_dir} is a file")
        check_output_apart(self.input, self.output_dir)

    def output_settings(self) -> dict:
        """The options that decide the output (a resumed run must use the same ones)."""
        # on_bad_sample: rows that are written do not depend on it (error mode only stops earlier).
        ignored = {"output_dir", "batch_size", "device", "disable_tqdm", "on_bad_sample"}
        return {k: v for k, v in asdict(self).items() if k not in ignored}


def _text_problem(row: SourceRow) -> str | None:
    """Why a row's caption or alt-text cannot be used, or None. Checked before the image is read: the texts go to
    spaCy, the tokenizer and JSON, where a 1M-character or lone-surrogate text would stop the whole run."""
    for name, text in (("caption", row.text), ("alt_text", row.alt_text)):
        problem = caption_problem(text, allow_empty=True)
        if problem is not None:
            return f"{name} {caption_preview(text)} {problem}"
    return None


class Annotator:
    """Runs steps 1-3 on batches of images and writes rows (step 4) through a `ShardWriter`."""

    def __init__(self, args: VeslArguments, detector, captioner=None):
        self.args, self.detector, self.captioner = args, detector, captioner

    def phrases(self, captions: list[str], alt_texts: list[str]) -> list[list[str]]:
        """Region phrase candidates per image from the chosen source."""
        if self.args.phrase_source == "alt_text_ngrams":
            return [alt_text_ngrams(t, self.args.ngram_max_n, self.args.max_ngrams) for t in alt_texts]
        return extract_region_phrases_batch(captions, self.args.max_phrases)

    def annotate_batch(self, batch: list[tuple[SourceRow, Image.Image, bytes, str]], writer, stats) -> None:
        """Caption, extract phrases, detect and write one batch."""
        if self.captioner is not None:
            generated = self.captioner([image for _, image, *_ in batch])
            stats.empty_generated_captions += sum(not c for c in generated)
            captions = [c or row.alt_text for c, (row, *_) in zip(generated, batch)]
        else:
            captions = [row.text or row.alt_text for row, *_ in batch]
        kept = [i for i, caption in enumerate(captions) if caption]
        stats.skipped_without_text += len(batch) - len(kept)
        if not kept:
            return
        batch, captions = [batch[i] for i in kept], [captions[i] for i in kept]
        alt_texts = [row.alt_text for row, *_ in batch]
        images = [image for _, image, *_ in batch]
        phrases = self.phrases(captions, alt_texts)
        regions = self.detector(images, phrases)
        for (row, image, data, extension), caption, alt_text, candidates, boxes in zip(
            batch, captions, alt_texts, phrases, regions
        ):
            record = {
                "caption": caption,
                "alt_text": alt_text,
                "width": image.width,
                "height": image.height,
                "regions": boxes,
                "source": row.key,
            }
            writer.add(record, data, extension)
            stats.add_image(caption, alt_text, candidates, boxes)

    def annotate_shard(self, shard: InputShard, output_dir: Path, progress=None) -> VeslStats:
        """Process one input shard into one committed output shard; returns its stats."""
        stats = VeslStats()
        writer = ShardWriter(output_dir, shard.index, self.args.output_format, self.args.output_settings())
        logged = 0

        def bad_row(message: str) -> None:
            # Error mode stops at the first bad row; skip mode names only the first few (the rest are counted).
            nonlocal logged
            if self.args.on_bad_sample == "error":
                raise ValueError(f"shard {shard.index} ({shard.name}), {message} (--on_bad_sample error)")
            if logged < _MAX_LOGGED_BAD_IMAGES:
                logger.warning(f"shard {shard.index} ({shard.name}), {message}; row skipped")
                logged += 1

        try:
            batch = []
            for row in shard.rows():
                if progress is not None:
                    progress.update(1)
                problem = _text_problem(row)
                if problem is not None:
                    bad_row(f"{row.key}: {problem}")
                    stats.bad_captions += 1
                    continue
                try:
                    image, data, extension = open_source_image(row.image)
                except RefusedFile as error:  # names the row and the path
                    bad_row(str(error))
                    stats.refused_files += 1
                    continue
                except Exception as error:  # PIL raises many types for corrupt files
                    bad_row(f"{row.key}: unreadable image ({error})")
                    stats.unreadable_images += 1
                    continue
                batch.append((row, image, data, extension))
                if len(batch) == self.args.batch_size:
                    self.annotate_batch(batch, writer, stats)
                    batch = []
            if batch:
                self.annotate_batch(batch, writer, stats)
        except BaseException:
            writer.abort()
            raise
        writer.commit(stats)
        return stats


def _check_config(output_dir: Path, settings: dict) -> None:
    path = output_dir / CONFIG_FILE
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); it records the run's settings: restore it, or use a new output "
                "folder"
            ) from None
        if not isinstance(previous, dict):
            raise ValueError(f"{path} must hold a JSON object of settings, got {type(previous).__name__}")
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"--output_dir {output_dir} holds a run with different settings (differs in {changed}); "
                "use a new output folder or the same options to resume"
            )
    else:
        write_atomically(path, json.dumps(settings, indent=2))


def annotate(args: VeslArguments, detector=None, captioner=None, max_shards: int | None = None) -> dict | None:
    """Run VESL over `args.input` into `args.output_dir` on this process's shards (all of them when run alone).

    Models are loaded from `args` unless given. `max_shards` stops this process after that many new shards (to
    simulate an interrupted run). Returns the run's summary once every shard is done (main process), else None.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    # Without an accelerator PartialState would ignore a CPU launch's process group unless told `cpu=True`.
    on_cpu = (args.device or "").startswith("cpu") or not torch.accelerator.is_available()
    state = PartialState(cpu=on_cpu)
    output_dir = Path(args.output_dir)
    check_output_apart(args.input, args.output_dir)  # again: `args` may have been changed since it was made
    shards = list_input_shards(args.input, args.rows_per_shard, args.split, args.image_column, args.text_column)
    settings = args.output_settings()
    if state.is_main_process:
        # Shards carry their settings: stale ones are refused even when vesl_config.json is gone, before writing.
        check_committed_shards(output_dir, args.output_format, settings)
        output_dir.mkdir(parents=True, exist_ok=True)
        _check_config(output_dir, settings)
    state.wait_for_everyone()
    mine = [s for s in shards if s.index % state.num_processes == state.process_index]
    todo = [s for s in mine if not shard_is_done(output_dir, s.index, args.output_format, settings)]
    if todo:
        device = torch.device(args.device) if args.device else state.device
        dtype = DTYPES[args.dtype]
        if detector is None:
            detector = OwlV2RegionDetector.from_pretrained(
                args.detector,
                device=device,
                dtype=dtype,
                threshold=args.threshold,
                nms_iou=args.nms_iou,
                max_regions=args.max_regions,
                image_size=args.detector_image_size or None,
            )
        if captioner is None and args.captioner:
            captioner = ImageCaptioner.from_pretrained(
                args.captioner,
                device=device,
                dtype=dtype,
                trust_remote_code=args.trust_remote_code,
                prompt=args.caption_prompt,
                max_new_tokens=args.caption_max_new_tokens,
                num_beams=args.caption_num_beams,
            )
    annotator = Annotator(args, detector, captioner)
    disable = args.disable_tqdm
    position = 2 * state.process_index
    shard_bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc="shards", position=position, disable=disable)
    started, finished = time.time(), []
    for count, shard in enumerate(todo):
        if max_shards is not None and count == max_shards:
            break
        bar = tqdm(
            total=shard.num_rows, desc=f"shard {shard.index}", position=position + 1, leave=False, disable=disable
        )
        with bar as image_bar:
            stats = annotator.annotate_shard(shard, output_dir, image_bar)
        shard_bar.update(1)
        shard_bar.set_postfix(images=stats.images, unreadable=stats.unreadable_images)
        finished.append(shard.index)
    shard_bar.close()
    logger.info(
        f"process {state.process_index} of {state.num_processes}: annotated shards {finished} "
        f"in {time.time() - started:.1f}s ({len(mine) - len(todo)} of its {len(mine)} were already done)"
    )
    state.wait_for_everyone()
    summary = None
    if state.is_main_process:
        summary = finalize_output(output_dir, len(shards), args.output_format, settings)
        if summary is not None:
            print(json.dumps(summary, indent=2))
    state.wait_for_everyone()
    return summary
