"""Loaders for SugarCrepe, ARO and Winoground in their file formats (small generated fixtures), evaluated with a
stub scorer whose scores are known, so the metrics can be checked by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.public_benchmarks import (
    evaluate_pairwise,
    evaluate_winoground,
    load_aro,
    load_sugarcrepe,
    load_winoground,
)


class RedScorer:
    """Scores a caption by how red the image is when it says 'red', else by how blue."""

    @staticmethod
    def _score(image, text):
        r, _, b = np.asarray(image, dtype=float).reshape(-1, 3).mean(0)
        return r - b if "red" in text else b - r

    def pair_scores(self, images, texts):
        return torch.tensor([self._score(i, t) for i, t in zip(images, texts)])

    def similarity(self, images, texts):
        return torch.tensor([[self._score(i, t) for t in texts] for i in images])


def test_sugarcrepe_and_aro_formats(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(images / "red.jpg")
    Image.new("RGB", (8, 8), (0, 0, 250)).save(images / "blue.jpg")
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "replace_att.json").write_text(
        json.dumps(
            {
                "0": {"filename": "red.jpg", "caption": "a red thing", "negative_caption": "a blue thing"},
                "1": {"filename": "blue.jpg", "caption": "a red thing", "negative_caption": "a blue thing"},
            }
        )
    )
    categories = load_sugarcrepe(tmp_path / "sc", images)
    assert list(categories) == ["replace_att"] and categories["replace_att"][1].image_path == images / "blue.jpg"
    assert evaluate_pairwise(RedScorer(), categories["replace_att"]) == 0.5  # right on red.jpg only

    half = Image.new("RGB", (8, 4), (0, 0, 250))
    half.paste(Image.new("RGB", (4, 4), (250, 0, 0)), (0, 0))
    half.save(images / "half.png")
    aro = [
        {
            "image_path": "half.png",
            "bbox_x": 0,
            "bbox_y": 0,
            "bbox_w": 4,
            "bbox_h": 4,
            "true_caption": "the red square",
            "false_caption": "the blue square",
        }
    ]
    (tmp_path / "visual_genome_attribution.json").write_text(json.dumps(aro))
    samples = load_aro(tmp_path / "visual_genome_attribution.json", images)
    assert samples[0].image().size == (4, 4)  # cropped to the box: all red
    assert evaluate_pairwise(RedScorer(), samples) == 1.0
    with pytest.raises(ValueError, match=r"entry 0: missing \['bbox_h'\]"):
        (tmp_path / "bad.json").write_text(json.dumps([{k: v for k, v in aro[0].items() if k != "bbox_h"}]))
        load_aro(tmp_path / "bad.json", images)


def test_winoground_format(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (250, 0, 0)).save(tmp_path / "images" / "ex0_img0.png")
    Image.new("RGB", (4, 4), (0, 0, 250)).save(tmp_path / "images" / "ex0_img1.png")
    rows = [
        {"id": 0, "image_0": "ex0_img0", "image_1": "ex0_img1", "caption_0": "red", "caption_1": "blue"},
        {"id": 1, "image_0": "ex0_img1", "image_1": "ex0_img0", "caption_0": "red", "caption_1": "blue"},
    ]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_winoground(tmp_path)
    assert [e["captions"] for e in examples] == [["red", "blue"]] * 2
    # example 0 matches perfectly; example 1 has the images swapped, so every comparison is wrong.
    assert evaluate_winoground(RedScorer(), examples) == {"text_score": 0.5, "image_score": 0.5, "group_score": 0.5}
