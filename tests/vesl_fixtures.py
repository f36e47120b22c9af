"""Tiny random OWLv2 and GIT captioner folders (built from configs, bundled CLIP tokenizer) and VESL inputs."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2ImageProcessorPil,
    Owlv2Processor,
)

from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, tiny_vision_config

# (width, height, caption): non-square in both directions, so the padded-square geometry matters.
IMAGES = [
    (48, 32, "a red square on a grey table"),
    (32, 48, "a green circle next to a blue box"),
    (40, 40, "a yellow triangle under a small tree"),
    (64, 24, "a blue car parked near an old house"),
    (24, 56, "a tall red bottle on a wooden shelf"),
    (36, 30, "a green ball beside a white chair"),
]
BAD_IMAGE = "broken.png"


def write_owlv2(folder: Path, seed: int = 0) -> Path:
    """A tiny random `Owlv2ForObjectDetection` + `Owlv2Processor` (text queries of at most 16 tokens)."""
    torch.manual_seed(seed)
    text = clip_vocab_text_config(hidden_size=32)
    vision = tiny_vision_config(hidden_size=32)
    text.pop("projection_dim"), vision.pop("projection_dim")
    # OWL's class head compares image embeddings in the text width with projected queries: the widths must agree.
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    image_processor = Owlv2ImageProcessorPil(size={"height": 32, "width": 32})
    Owlv2Processor(image_processor=image_processor, tokenizer=bundled_clip_tokenizer(16)).save_pretrained(folder)
    return folder


def write_git_captioner(folder: Path, seed: int = 0) -> Path:
    """A tiny random GIT image-to-text model (`AutoModelForImageTextToText`) with a CLIP tokenizer."""
    torch.manual_seed(seed)
    vision = tiny_vision_config()
    vision.pop("projection_dim")
    text = clip_vocab_text_config(max_position_embeddings=64)
    text.pop("projection_dim")
    config = GitConfig(vision_config=vision, **text)
    GitForCausalLM(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    GitProcessor(image_processor=image_processor, tokenizer=bundled_clip_tokenizer()).save_pretrained(folder)
    return folder


def image_bytes(index: int, width: int, height: int) -> bytes:
    """A PNG of a coloured rectangle on noise (deterministic per index)."""
    rng = np.random.default_rng(index)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    array[height // 4 : height // 2, width // 4 : width // 2] = (200, 40 * index % 255, 30)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_imagefolder(folder: Path, bad_image: bool = True) -> Path:
    """The `IMAGES` as an imagefolder (captions are the alt-texts), plus one corrupt file after the third image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (width, height, caption) in enumerate(IMAGES):
        (folder / f"{index:03d}.png").write_bytes(image_bytes(index, width, height))
        rows.append({"file_name": f"{index:03d}.png", "caption": caption})
        if bad_image and index == 2:
            (folder / BAD_IMAGE).write_bytes(b"not an image")
            rows.append({"file_name": BAD_IMAGE, "caption": "a broken picture of a cat"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def write_tars(folder: Path, per_tar: int = 2) -> Path:
    """The `IMAGES` as WebDataset shards (`<key>.png` + `<key>.json` with `caption`); the first shard also holds
    a truncated PNG (valid header, so only decoding fails)."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(IMAGES), per_tar):
        samples = []
        for index in range(start, min(start + per_tar, len(IMAGES))):
            width, height, caption = IMAGES[index]
            samples.append((f"img{index:03d}", image_bytes(index, width, height), caption))
        if start == 0:
            samples.insert(1, ("truncated", image_bytes(99, 40, 40)[:60], "a truncated picture of a dog"))
        with tarfile.open(folder / f"input-{start // per_tar:03d}.tar", "w") as archive:
            for key, png, caption in samples:
                for name, data in ((f"{key}.png", png), (f"{key}.json", json.dumps({"caption": caption}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_datasets_input(folder: Path, kind: str) -> Path:
    """The `IMAGES` as a `datasets` dataset: `save_to_disk` folder or two Parquet files (Image feature + caption)."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "caption": Value("string")})
    rows = {
        "image": [{"bytes": image_bytes(i, w, h), "path": None} for i, (w, h, _) in enumerate(IMAGES)],
        "caption": [caption for _, _, caption in IMAGES],
    }
    dataset = Dataset.from_dict(rows, features=features)
    if kind == "save_to_disk":
        dataset.save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True)
        half = len(IMAGES) // 2
        dataset.select(range(half)).to_parquet(str(folder / "part-0.parquet"))
        dataset.select(range(half, len(IMAGES))).to_parquet(str(folder / "part-1.parquet"))
    return folder
