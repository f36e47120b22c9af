"""Synthetic scene generator: determinism, geometry of relations, tight boxes, no overlaps, held-out pairs,
jitter (sizes and background) and the validation / plain test splits."""

import hashlib
import json
import random

import numpy as np
import pytest

from examples import make_synthetic_data
from training.data import load_image_text_dataset, open_image
from training.synthetic import (
    BACKGROUND,
    COLOURS,
    JITTER_GREY,
    SceneConfig,
    SceneObject,
    describe_scene,
    generate_scene,
    held_out_pairs,
    make_synthetic_dataset,
    object_pairs,
    relation_between,
)

ALL_SPLITS = ("train", "test_seen", "test_unseen", "val_seen", "val_unseen", "test_seen_plain", "test_unseen_plain")


def scenes(count=60, seed=0, **config):
    rng = random.Random(seed)
    config = SceneConfig(**config)
    return [generate_scene(rng, config) for _ in range(count)]


def folder_bytes(folder) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def image_hashes(folder) -> set:
    return {hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.glob("*.png")}


@pytest.mark.parametrize("flags", [[], ["--jitter"]])
def test_same_seed_same_dataset_other_seed_differs(tmp_path, flags):
    run = lambda name, seed: make_synthetic_data.main(  # noqa: E731
        ["--output_dir", str(tmp_path / name), "--num_images", "20", "--seed", str(seed), *flags]
    )
    counts = run("a", 3)
    assert run("b", 3) == counts and run("c", 4) == counts
    expected = ALL_SPLITS if flags else ALL_SPLITS[:5]
    assert set(counts) == set(expected) and {p.name for p in (tmp_path / "a").iterdir() if p.is_dir()} == set(counts)
    for split in counts:
        assert folder_bytes(tmp_path / "a" / split) == folder_bytes(tmp_path / "b" / split), split
        assert folder_bytes(tmp_path / "a" / split) != folder_bytes(tmp_path / "c" / split), split


def test_validation_and_plain_splits_do_not_change_train_or_test(tmp_path):
    for jitter in (False, True):
        config = SceneConfig(jitter=jitter)
        with_val = make_synthetic_dataset(tmp_path / f"v{jitter}", 15, seed=2, config=config)
        without = make_synthetic_dataset(tmp_path / f"n{jitter}", 15, seed=2, config=config, validation=False)
        assert set(with_val) - set(without) == {"val_seen", "val_unseen"}
        for split in without:
            assert folder_bytes(tmp_path / f"v{jitter}" / split) == folder_bytes(tmp_path / f"n{jitter}" / split)


@pytest.mark.parametrize("config", [{"use_sizes": True}, {"jitter": True}])
def test_relations_follow_box_geometry_and_boxes_are_tight_and_apart(config):
    for image, sample in scenes(80, **config):
        pixels = np.asarray(image).astype(int)
        background = pixels[0, 0]  # the margin keeps the border clear
        assert config.get("jitter") or tuple(background) == BACKGROUND
        drawn = np.abs(pixels - background).sum(-1) > 0
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


def test_jittered_sides_span_the_range_and_background_greys_vary():
    size = 64
    sides, greys = [], set()
    for image, sample in scenes(300, seed=5, jitter=True, image_size=size):
        pixel = image.getpixel((0, 0))
        assert pixel[0] == pixel[1] == pixel[2] and JITTER_GREY[0] <= pixel[0] <= JITTER_GREY[1]
        greys.add(pixel[0])
        for region in sample["regions"]:
            x0, y0, x1, y1 = region["bbox"]
            sides.append(max(x1 - x0, y1 - y0))
    assert min(sides) < 0.21 * size and max(sides) > 0.31 * size
    assert round(0.19 * size) <= min(sides) and max(sides) <= round(0.33 * size)
    assert min(greys) <= 190 and max(greys) >= 210 and len(greys) >= 20
    plain = {image.getpixel((0, 0)) for image, _ in scenes(30)}
    assert plain == {BACKGROUND}


def test_jittered_text_equals_the_unjittered_description_of_the_same_objects():
    words = {"small", "medium", "large"}
    for _, sample in scenes(80, seed=7, jitter=True):
        objects = [
            SceneObject(o["name"], o["attributes"][-1], "medium", [int(v) for v in region["bbox"]])
            for o, region in zip(sample["scene_graph"]["objects"], sample["regions"])
        ]
        expected = describe_scene(objects, SceneConfig(), random.Random(0))
        for key in ("caption", "scene_graph", "regions"):
            assert sample[key] == expected[key], key
        assert not words & set(sample["caption"].split())
        assert all(len(o["attributes"]) == 1 for o in sample["scene_graph"]["objects"])


def test_held_out_pairs_never_appear_in_training(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--num_images", "60", "--seed", "1", "--jitter", "true"]
    counts = make_synthetic_data.main(argv)
    assert counts == {"train": 60, **{split: 12 for split in ALL_SPLITS[1:]}}
    held = {frozenset(tuple(o) for o in pair) for pair in json.loads((tmp_path / "held_out_pairs.json").read_text())}
    assert held == held_out_pairs(SceneConfig(), 1) and len(held) == round(0.3 * 435)

    def pairs(row):
        objects = [(o["attributes"][-1], o["name"]) for o in row["scene_graph"]["objects"]]
        return {frozenset(p) for i, a in enumerate(objects) for p in [(a, b) for b in objects[i + 1 :]]}

    rows = {s: load_image_text_dataset(str(tmp_path / s)) for s in counts}
    for split in ("train", "test_seen", "val_seen", "test_seen_plain"):
        assert all(not (pairs(r) & held) for r in rows[split]), split
    for split in ("test_unseen", "val_unseen", "test_unseen_plain"):
        assert all(pairs(r) & held for r in rows[split]), split
    for split in ALL_SPLITS[1:]:
        assert all(len(r["regions"]) == 2 for r in rows[split]), split
    first = rows["train"][0]
    assert open_image(first, "row 0").size == (64, 64) and first["regions"][0]["text"]
    # plain splits: fixed medium side (16 px) on the fixed background
    for split in ("test_seen_plain", "test_unseen_plain"):
        for row in rows[split]:
            assert open_image(row, split).getpixel((0, 0)) == BACKGROUND
            assert all(r["bbox"][2] - r["bbox"][0] == 16 for r in row["regions"])
    hashes = {split: image_hashes(tmp_path / split) for split in counts}
    for val in ("val_seen", "val_unseen"):
        assert len(hashes[val]) == 12
        for other in counts:
            if other != val:
                assert not hashes[val] & hashes[other], (val, other)
    captions = {s: {r["caption"] for r in rows[s]} for s in counts}
    assert captions["val_unseen"] != captions["test_unseen"]


def test_no_held_out_pairs_means_no_unseen_splits(tmp_path):
    config = SceneConfig(held_out_fraction=0.0, jitter=True)
    counts = make_synthetic_dataset(tmp_path, 5, seed=0, config=config)
    assert counts == {"train": 5, "test_seen": 1, "val_seen": 1, "test_seen_plain": 1}


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="1 <= min_objects <= max_objects <= 3"):
        SceneConfig(max_objects=4)
    with pytest.raises(ValueError, match="unknown colours"):
        SceneConfig(colours=("red", "teal"))
    with pytest.raises(ValueError, match="jitter and use_sizes cannot be combined"):
        SceneConfig(jitter=True, use_sizes=True)
    assert object_pairs([]) == set()
