"""A tiny generated training set in the `docs/data.md` imagefolder format and tiny model config files."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.factories import clip_vocab_text_config, tiny_binding_config, tiny_vision_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def write_dataset(folder: Path, rows: int = 8, bad_rows: int = 0) -> Path:
    """`rows` 32 px images, each a coloured square on grey, with caption, scene graph and one region;
    `bad_rows` extra rows with a corrupt image file."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    metadata = []
    for i in range(rows):
        colour = names[i % len(names)]
        x0, y0 = 2 + 3 * (i % 5), 4 + 2 * (i % 4)
        array = np.full((32, 32, 3), 128, dtype=np.uint8)
        array[y0 : y0 + 12, x0 : x0 + 12] = COLOURS[colour]
        Image.fromarray(array).save(folder / f"{i:03d}.png")
        metadata.append(
            {
                "file_name": f"{i:03d}.png",
                "caption": f"a {colour} square",
                "scene_graph": {"objects": [{"name": "square", "attributes": [colour]}], "relations": []},
                "regions": [{"bbox": [x0, y0, x0 + 12, y0 + 12], "text": f"{colour} square", "score": 1.0}],
            }
        )
    for j in range(bad_rows):
        (folder / f"bad{j}.png").write_bytes(b"not a png")
        metadata.append({"file_name": f"bad{j}.png", "caption": "broken", "scene_graph": None, "regions": []})
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in metadata:
            handle.write(json.dumps(row) + "\n")
    return folder


def write_model_config(path: Path, family: str) -> Path:
    """A tiny config JSON (CLIP vocabulary, so the bundled tokenizer fits) for `--model_config`."""
    config = {
        "text_config": clip_vocab_text_config(),
        "vision_config": tiny_vision_config(),
        "projection_dim": 24,
    }
    if family == "occlip":
        config["binding_config"] = tiny_binding_config()
    if family == "cloc":
        config["prompter_config"] = {"initializer_range": 0.2}
    path.write_text(json.dumps(config))
    return path
