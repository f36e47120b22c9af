"""Synthetic scene generator: determinism, geometry of relations, tight boxes, no overlaps, held-out pairs."""

import json
import random

import numpy as np
import pytest

from examples import make_synthetic_data
from training.data import load_image_text_dataset, open_image
from training.synthetic import (
    BACKGROUND,
    COLOURS,
    SceneConfig,
    generate_scene,
    held_out_pairs,
    object_pairs,
    relation_between,
)


def scenes(count=60, seed=0, **config):
    rng = random.Random(seed)
    config = SceneConfig(**config)
    return [generate_scene(rng, config) for _ in range(count)]


def test_same_seed_same_dataset_other_seed_differs(tmp_path):
    make_synthetic_data.main(["--output_dir", str(tmp_path / "a"), "--num_images", "20", "--seed", "3"])
    make_synthetic_data.main(["--output_dir", str(tmp_path / "b"), "--num_images", "20", "--seed", "3"])
    make_synthetic_data.main(["--output_dir", str(tmp_path / "c"), "--num_images", "20", "--seed", "4"])
    for split in ("train", "test_seen", "test_unseen"):
        a = (tmp_path / "a" / split / "metadata.jsonl").read_text()
        assert a == (tmp_path / "b" / split / "metadata.jsonl").read_text()
        assert (tmp_path / "a" / split / "000000.png").read_bytes() == (
            tmp_path / "b" / split / "000000.png"
        ).read_bytes()
    assert (tmp_path / "a/train/metadata.jsonl").read_text() != (tmp_path / "c/train/metadata.jsonl").read_text()


def test_relations_follow_box_geometry_and_boxes_are_tight_and_apart():
    for image, sample in scenes(80, use_sizes=True):
        pixels = np.asarray(image).astype(int)
        drawn = np.abs(pixels - np.array(BACKGROUND)).sum(-1) > 0
        covered = np.zeros_like(drawn)
        boxes = [region["bbox"] for region in sample["regions"]]
        for region, obj in zip(sample["regions"], sample["scene_graph"]["objects"]):
            x0, y0, x1, y1 = map(int, region["bbox"])
            colour = np.array(COLOURS[obj["attributes"][-1]])
            mine = (pixels[y0:y1, x0:x1] == colour).all(-1)
            # tight: the object's colour touches all four sides of its box
            assert mine[0].any() and mine[-1].any() and mine[:, 0].any() and mine[:, -1].any(), region
            covered[y0:y1, x0:x1] = True
            assert region["text"] == " ".join(obj["attributes"] + [obj["name"]])
        assert not (drawn & ~covered).any()  # nothing drawn outside the boxes
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1], (p, q)
        for relation in sample["scene_graph"]["relations"]:
            s, o = relation["subject"], relation["object"]
            cs = [(boxes[s][0] + boxes[s][2]) / 2, (boxes[s][1] + boxes[s][3]) / 2]
            co = [(boxes[o][0] + boxes[o][2]) / 2, (boxes[o][1] + boxes[o][3]) / 2]
            dx, dy = cs[0] - co[0], cs[1] - co[1]
            expected = (
                ("to the left of" if dx < 0 else "to the right of")
                if abs(dx) >= abs(dy)
                else ("above" if dy < 0 else "below")
            )
            assert relation["predicate"] == expected


def test_relation_rule_on_hand_made_boxes():
    assert relation_between([0, 0, 10, 10], [20, 2, 30, 12]) == "to the left of"
    assert relation_between([20, 2, 30, 12], [0, 0, 10, 10]) == "to the right of"
    assert relation_between([0, 0, 10, 10], [2, 30, 12, 40]) == "above"
    assert relation_between([2, 30, 12, 40], [0, 0, 10, 10]) == "below"


def test_negatives_differ_from_the_caption_in_the_named_way():
    for _, sample in scenes(60):
        caption, negatives = sample["caption"], sample["negatives"]
        assert caption not in negatives.values()
        objects = sample["scene_graph"]["objects"]
        if len(objects) == 2 and objects[0]["attributes"] != objects[1]["attributes"]:
            swap = negatives["attribute_swap"]
            assert sorted(swap.split()) == sorted(caption.split())  # same words, colours exchanged
            a, b = objects[0]["attributes"][0], objects[1]["attributes"][0]
            assert swap == caption.replace(a, "#").replace(b, a).replace("#", b)
            relation = sample["scene_graph"]["relations"][0]["predicate"]
            parts = [part.strip() for part in caption.split(f" {relation} ")]
            assert negatives["relation_swap"] == f" {relation} ".join(parts[::-1])
        if len(objects) == 1:
            assert set(negatives) <= {"shape_replace", "colour_replace"}


def test_held_out_pairs_never_appear_in_training(tmp_path):
    counts = make_synthetic_data.main(["--output_dir", str(tmp_path), "--num_images", "60", "--seed", "1"])
    assert counts == {"train": 60, "test_seen": 12, "test_unseen": 12}
    held = {frozenset(tuple(o) for o in pair) for pair in json.loads((tmp_path / "held_out_pairs.json").read_text())}
    assert held == held_out_pairs(SceneConfig(), 1) and len(held) == round(0.3 * 435)

    def pairs(row):
        objects = [(o["attributes"][-1], o["name"]) for o in row["scene_graph"]["objects"]]
        return {frozenset(p) for i, a in enumerate(objects) for p in [(a, b) for b in objects[i + 1 :]]}

    rows = {s: load_image_text_dataset(str(tmp_path / s)) for s in counts}
    assert all(not (pairs(r) & held) for r in rows["train"]) and all(not (pairs(r) & held) for r in rows["test_seen"])
    assert all(pairs(r) & held for r in rows["test_unseen"])
    first = rows["train"][0]
    assert open_image(first, "row 0").size == (64, 64) and first["regions"][0]["text"]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="1 <= min_objects <= max_objects <= 3"):
        SceneConfig(max_objects=4)
    with pytest.raises(ValueError, match="unknown colours"):
        SceneConfig(colours=("red", "teal"))
    assert object_pairs([]) == set()
