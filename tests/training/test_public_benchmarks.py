"""Loaders for SugarCrepe, ARO, Winoground, COCO regions and RefCOCO in their file formats (small generated fixtures), evaluated with a
stub scorer whose scores are known, so the metrics can be checked by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.public_benchmarks import (
    evaluate_aro,
    evaluate_coco_regions,
    evaluate_pairwise,
    evaluate_refcoco,
    evaluate_winoground,
    find_refs_file,
    load_aro,
    load_coco_regions,
    load_refcoco,
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


def _aro_row(image, relation=None, attributes=None, true="the red square", false="the blue square"):
    row = {"image_path": image, "bbox_x": 0, "bbox_y": 0, "bbox_w": 4, "bbox_h": 4}
    row.update(true_caption=true, false_caption=false)
    if relation is not None:
        row["relation_name"] = relation
    if attributes is not None:
        row["attributes"] = attributes
    return row


def test_aro_reports_the_macro_average_over_relations_and_attributes(tmp_path):
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 250)).save(tmp_path / "blue.png")
    # "on": 3 samples, all right (red images); "under": 1 sample, wrong (a blue image captioned red).
    rows = [_aro_row("red.png", "on")] * 3 + [_aro_row("blue.png", "under")]
    (tmp_path / "visual_genome_relation.json").write_text(json.dumps(rows))
    samples = load_aro(tmp_path / "visual_genome_relation.json", tmp_path)
    assert [s.group for s in samples] == ["on", "on", "on", "under"]
    metrics = evaluate_aro(RedScorer(), samples, batch_size=3)
    assert metrics["accuracy"] == 0.75  # the plain mean over samples
    assert metrics["per_group"] == {"on": 1.0, "under": 0.0}
    assert metrics["macro_accuracy"] == 0.5  # each relation weighted alike, as ARO reports
    left_out = evaluate_aro(RedScorer(), samples, exclude_groups=["under"])
    assert (
        left_out["macro_accuracy"] == 1.0 and left_out["accuracy"] == 0.75 and left_out["excluded_groups"] == ["under"]
    )
    # VG-Attribution groups by the attribute pair.
    rows = [_aro_row("red.png", attributes=["red", "blue"])] + [_aro_row("blue.png", attributes=["white", "blue"])] * 2
    (tmp_path / "visual_genome_attribution.json").write_text(json.dumps(rows))
    metrics = evaluate_aro(RedScorer(), load_aro(tmp_path / "visual_genome_attribution.json", tmp_path))
    assert metrics["per_group"] == {"red_blue": 1.0, "white_blue": 0.0}
    assert metrics["macro_accuracy"] == 0.5 and metrics["accuracy"] == pytest.approx(1 / 3)


def test_image_names_must_stay_inside_the_image_folder(tmp_path):
    from processing.files import RefusedFile

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (250, 0, 0)).save(tmp_path / "secret.png")
    (tmp_path / "aro.json").write_text(json.dumps([_aro_row("../secret.png", "on")]))
    samples = load_aro(tmp_path / "aro.json", tmp_path / "images")
    with pytest.raises(RefusedFile, match="outside the dataset folder"):
        samples[0].image()
    (tmp_path / "sc").mkdir()
    entry = {"filename": "../secret.png", "caption": "a", "negative_caption": "b"}
    (tmp_path / "sc" / "swap_obj.json").write_text(json.dumps({"0": entry}))
    with pytest.raises(RefusedFile, match="outside the dataset folder"):
        load_sugarcrepe(tmp_path / "sc", tmp_path / "images")["swap_obj"][0].image()


class ColourRegionScorer:
    """Region scores by colour: a box's score for a text is the mean of the channel the text names."""

    family = "stub"
    channels = {"red": 0, "green": 1, "blue": 2}

    def region_scores(self, images, boxes, texts, crop=False):
        rows = []
        for image, image_boxes in zip(images, boxes):
            for box in image_boxes:
                mean = np.asarray(image.crop(tuple(int(v) for v in box)), dtype=float).reshape(-1, 3).mean(0)
                rows.append([mean[self.channels[next(w for w in t.split() if w in self.channels)]] for t in texts])
        return torch.tensor(rows)

    def ground(self, images, captions):
        # "left" -> the left half of the image, anything else -> the right half (pixel xyxy)
        out = []
        for image, texts in zip(images, captions):
            w, h = image.size
            out.append(torch.tensor([[0, 0, w / 2, h] if "left" in t else [w / 2, 0, w, h] for t in texts]))
        return out


def _two_colour_image(path):
    image = Image.new("RGB", (40, 20), (0, 0, 250))
    image.paste(Image.new("RGB", (20, 20), (250, 0, 0)), (0, 0))  # left half red, right half blue
    image.save(path)


def test_coco_region_classification_format(tmp_path):
    (tmp_path / "val2017").mkdir()
    _two_colour_image(tmp_path / "val2017" / "000000000001.jpg")
    Image.new("RGB", (10, 10), (0, 250, 0)).save(tmp_path / "val2017" / "000000000002.png")
    instances = {
        "images": [
            {"id": 2, "file_name": "000000000002.png", "width": 10, "height": 10},
            {"id": 1, "file_name": "000000000001.jpg", "width": 40, "height": 20},
        ],
        # ids out of order: classes come in category-id order, red (1), blue (3), green (7)
        "categories": [{"id": 7, "name": "green"}, {"id": 1, "name": "red"}, {"id": 3, "name": "blue"}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [0, 0, 20, 20], "category_id": 1, "iscrowd": 0},  # red: right
            {"id": 11, "image_id": 1, "bbox": [20, 0, 20, 20], "category_id": 7, "iscrowd": 0},  # blue labelled green
            {"id": 12, "image_id": 1, "bbox": [0, 0, 40, 20], "category_id": 3, "iscrowd": 1},  # crowd: left out
            {"id": 13, "image_id": 2, "bbox": [1, 1, 8, 8], "category_id": 7, "iscrowd": 0},  # green: right
            {"id": 14, "image_id": 2, "bbox": [1, 1, 0.5, 8], "category_id": 1, "iscrowd": 0},  # < 1 px: left out
        ],
    }
    (tmp_path / "instances_val2017.json").write_text(json.dumps(instances))
    images, classes = load_coco_regions(tmp_path / "instances_val2017.json", tmp_path / "val2017")
    assert classes == ["red", "blue", "green"]
    assert [(i.name, i.boxes, i.labels) for i in images] == [
        ("000000000001.jpg", [[0.0, 0.0, 20.0, 20.0], [20.0, 0.0, 40.0, 20.0]], [0, 2]),
        ("000000000002.png", [[1.0, 1.0, 9.0, 9.0]], [2]),
    ]
    metrics = evaluate_coco_regions(ColourRegionScorer(), images, classes, template="a {} thing", crop=True)
    assert metrics == {"top1": pytest.approx(2 / 3), "num_boxes": 3, "num_images": 2}
    instances["images"][0].pop("file_name")
    (tmp_path / "bad.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match="bad.json: image 2 has no 'file_name'"):
        load_coco_regions(tmp_path / "bad.json", tmp_path / "val2017")
    del instances["categories"]
    (tmp_path / "bad.json").write_text(json.dumps(instances))
    with pytest.raises(ValueError, match=r"not a COCO instances file \(missing \['categories'\]\)"):
        load_coco_regions(tmp_path / "bad.json", tmp_path / "val2017")


def test_refcoco_grounding_format(tmp_path):
    import pickle

    (tmp_path / "images").mkdir()
    _two_colour_image(tmp_path / "images" / "COCO_train2014_000000000005.jpg")
    instances = {
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 40, "height": 20}],
        "annotations": [
            {"id": 50, "image_id": 5, "bbox": [0, 0, 20, 20], "category_id": 1},  # the red left half
            {"id": 51, "image_id": 5, "bbox": [20, 0, 20, 20], "category_id": 1},  # the blue right half
        ],
        "categories": [{"id": 1, "name": "square"}],
    }
    sentence = lambda text: {"sent": text, "raw": text, "tokens": text.split()}  # noqa: E731
    refs = [
        {"ref_id": 0, "ann_id": 50, "image_id": 5, "split": "val", "sentences": [sentence("left red square")]},
        # the stub grounds "the blue one" to the right half (right) and "blue on the left" to the left (wrong)
        {
            "ref_id": 1,
            "ann_id": 51,
            "image_id": 5,
            "split": "val",
            "sentences": [sentence("the blue one"), sentence("blue on the left")],
        },
        {"ref_id": 2, "ann_id": 51, "image_id": 5, "split": "testA", "sentences": [sentence("left")]},
    ]
    folder = tmp_path / "refcoco"
    folder.mkdir()
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    refs_file = find_refs_file(folder)
    samples = load_refcoco(refs_file, folder / "instances.json", tmp_path / "images", split="val")
    assert [(s.expression, s.box) for s in samples] == [
        ("left red square", [0.0, 0.0, 20.0, 20.0]),
        ("the blue one", [20.0, 0.0, 40.0, 20.0]),
        ("blue on the left", [20.0, 0.0, 40.0, 20.0]),
    ]
    metrics = evaluate_refcoco(ColourRegionScorer(), samples)
    assert metrics == {"acc@0.5": pytest.approx(2 / 3), "mean_iou": pytest.approx(2 / 3), "num_expressions": 3}
    # The same refs as JSON read alike; a pickle that names a class (code) is refused.
    (folder / "refs.json").write_text(json.dumps(refs))
    assert load_refcoco(folder / "refs.json", folder / "instances.json", tmp_path / "images") == samples
    (folder / "evil.p").write_bytes(pickle.dumps([{"x": Image.Image}]))
    with pytest.raises(ValueError, match="only plain lists, dicts and strings"):
        load_refcoco(folder / "evil.p", folder / "instances.json", tmp_path / "images")
    with pytest.raises(ValueError, match=r"no refs in split 'testB' \(splits present: \['testA', 'val'\]\)"):
        load_refcoco(refs_file, folder / "instances.json", tmp_path / "images", split="testB")
