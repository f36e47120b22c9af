"""`python -m training.evaluate` / `occlip-cloc-evaluate` end to end on a tiny saved CLOC model: the JSON it
writes equals the library functions' results on the same model and data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from processing import CLOCProcessor
from tests.factories import clip_vocab_text_config, tiny_vision_config
from training import public_benchmarks as pb
from training.evaluate import load_scorer, main
from training.evaluation import evaluate_synthetic

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved_cloc(tmp_path_factory) -> Path:
    from modeling_cloc import CLOCConfig, CLOCModel

    folder = tmp_path_factory.mktemp("cloc")
    torch.manual_seed(0)
    config = CLOCConfig(
        text_config=clip_vocab_text_config(max_position_embeddings=77),
        vision_config=tiny_vision_config(),
        prompter_config={"initializer_range": 0.2},
        projection_dim=24,
    )
    CLOCModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLOCProcessor(image_processor).save_pretrained(folder)
    return folder


def _image(path, colour, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def coco_fixture(root: Path) -> Path:
    _image(root / "val2017" / "1.jpg", (200, 30, 30))
    _image(root / "val2017" / "2.jpg", (30, 30, 200), size=(32, 48))
    instances = {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "car", "bus", "tree", "sky"])],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [4, 4, 20, 20], "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 1, "bbox": [10, 2, 20, 28], "category_id": 4, "iscrowd": 0},
            {"id": 3, "image_id": 2, "bbox": [0, 10, 30, 30], "category_id": 6, "iscrowd": 0},
        ],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(instances))
    return root


def test_coco_regions_refcoco_and_aro_from_the_command(saved_cloc, tmp_path, capsys):
    scorer = load_scorer(saved_cloc, "cpu")
    assert scorer.family == "cloc"
    coco = coco_fixture(tmp_path / "coco")
    out = tmp_path / "coco.json"
    argv = ["--model_dir", str(saved_cloc), "--benchmark", "coco_regions", "--data_dir", str(coco)]
    assert main(argv + ["--output_file", str(out), "--template", "a photo of a {}.", "--no_progress"]) == 0
    written = json.loads(out.read_text())
    images, classes = pb.load_coco_regions(coco / "annotations" / "instances_val2017.json", coco / "val2017")
    expected = pb.evaluate_coco_regions(scorer, images, classes, "a photo of a {}.")
    assert written["metrics"] == {**expected, "region_mode": "model"}
    assert set(written["metrics"]) >= {"top1", "top5", "num_boxes"} and written["metrics"]["num_boxes"] == 3
    assert written["benchmark"] == "coco_regions" and written["family"] == "cloc"
    assert "wrote" in capsys.readouterr().out

    refer = tmp_path / "refcoco"
    refer.mkdir()
    (refer / "instances.json").write_text((coco / "annotations" / "instances_val2017.json").read_text())
    refs = [
        {"ref_id": 0, "ann_id": 1, "image_id": 1, "split": "val", "sentences": [{"sent": "the cat on the left"}]},
        {"ref_id": 1, "ann_id": 3, "image_id": 2, "split": "val", "sentences": [{"sent": "sky"}, {"sent": "blue"}]},
    ]
    (refer / "refs.json").write_text(json.dumps(refs))
    out = tmp_path / "refcoco.json"
    argv = ["--model_dir", str(saved_cloc), "--benchmark", "refcoco", "--data_dir", str(refer), "--no_progress"]
    assert main(argv + ["--image_dir", str(coco / "val2017"), "--output_file", str(out)]) == 0
    samples = pb.load_refcoco(refer / "refs.json", refer / "instances.json", coco / "val2017")
    assert json.loads(out.read_text())["metrics"] == pb.evaluate_refcoco(scorer, samples)

    aro = tmp_path / "aro"
    _image(aro / "images" / "a.jpg", (200, 30, 30))
    row = {"image_path": "a.jpg", "bbox_x": 0, "bbox_y": 0, "bbox_w": 30, "bbox_h": 30}
    rows = [
        {
            **row,
            "relation_name": "on",
            "true_caption": "the cup is on the table",
            "false_caption": "the table is on the cup",
        },
        {**row, "relation_name": "under", "true_caption": "a dog under a car", "false_caption": "a car under a dog"},
        {**row, "relation_name": "on", "true_caption": "a hat on a man", "false_caption": "a man on a hat"},
    ]
    (aro / "visual_genome_relation.json").write_text(json.dumps(rows))
    out = tmp_path / "aro.json"
    assert (
        main(["--model_dir", str(saved_cloc), "--benchmark", "aro", "--data_dir", str(aro), "--output_file", str(out)])
        == 0
    )
    assert "pairs: 100%" in capsys.readouterr().err  # the progress bar
    metrics = json.loads(out.read_text())["metrics"]
    expected = pb.evaluate_aro(scorer, pb.load_aro(aro / "visual_genome_relation.json", aro / "images"))
    assert metrics == {"vg_relation": expected}
    per = expected["per_group"]
    assert expected["macro_accuracy"] == pytest.approx((per["on"] + per["under"]) / 2)
    argv = ["--model_dir", str(saved_cloc), "--benchmark", "aro", "--data_dir", str(aro), "--aro_exclude", "under"]
    assert main(argv + ["--output_file", str(out), "--no_progress"]) == 0
    assert json.loads(out.read_text())["metrics"]["vg_relation"]["macro_accuracy"] == per["on"]


def test_errors_name_the_problem(saved_cloc, tmp_path, capsys):
    argv = ["--model_dir", str(saved_cloc), "--data_dir", str(tmp_path)]
    assert main(argv + ["--benchmark", "imagenet"]) == 2
    assert "--benchmark must be one of synthetic, sugarcrepe" in capsys.readouterr().err
    assert main(argv + ["--benchmark", "refcoco"]) == 2
    assert "needs --image_dir" in capsys.readouterr().err
    assert main(argv + ["--benchmark", "aro"]) == 2
    assert "--image_dir" in capsys.readouterr().err  # DATA_DIR/images does not exist
    assert main(["--model_dir", str(tmp_path), "--data_dir", str(tmp_path), "--benchmark", "aro"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(argv + ["--benchmark", "synthetic"]) == 2  # a folder of splits, not one split
    assert f"synthetic split {tmp_path}: expected a folder with metadata.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_python_dash_m_on_the_synthetic_benchmark(saved_cloc, tmp_path):
    from training.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", num_images=5, seed=0, validation=False)
    out = tmp_path / "synthetic.json"
    command = [sys.executable, "-m", "training.evaluate", "--model_dir", str(saved_cloc), "--benchmark", "synthetic"]
    command += ["--data_dir", str(tmp_path / "data" / "test_seen"), "--output_file", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "grounding:" in done.stderr and "batch" in done.stderr  # the scorer's progress bars
    metrics = json.loads(out.read_text())["metrics"]
    expected = evaluate_synthetic(load_scorer(saved_cloc, "cpu"), tmp_path / "data" / "test_seen", region_mode="model")
    assert metrics == pytest.approx(expected)
    assert {"image_to_text_R@1", "region_classification", "grounding_acc50"} <= set(metrics)


def test_console_script_is_declared():
    import importlib

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["occlip-cloc-evaluate"].split(":")
    assert getattr(importlib.import_module(module), function) is main


def test_sugarcrepe_and_winoground_on_a_saved_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from processing.clip_tokenizer import bundled_clip_tokenizer

    torch.manual_seed(0)
    text = clip_vocab_text_config(max_position_embeddings=77)
    CLIPModel(CLIPConfig(text_config=text, vision_config=tiny_vision_config(), projection_dim=24)).save_pretrained(
        tmp_path / "clip"
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor, bundled_clip_tokenizer()).save_pretrained(tmp_path / "clip")
    scorer = load_scorer(tmp_path / "clip", "cpu")
    assert scorer.family == "clip"

    _image(tmp_path / "coco" / "a.jpg", (200, 30, 30))
    _image(tmp_path / "coco" / "b.jpg", (30, 200, 30))
    entries = {
        "0": {"filename": "a.jpg", "caption": "a red wall", "negative_caption": "a green wall"},
        "1": {"filename": "b.jpg", "caption": "a green field", "negative_caption": "a red field"},
        "2": {"filename": "b.jpg", "caption": "a dog chases a cat", "negative_caption": "a cat chases a dog"},
    }
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "replace_att.json").write_text(json.dumps(dict(list(entries.items())[:2])))
    (tmp_path / "sc" / "swap_obj.json").write_text(json.dumps({"2": entries["2"]}))
    out = tmp_path / "sc.json"
    argv = ["--model_dir", str(tmp_path / "clip"), "--benchmark", "sugarcrepe", "--data_dir", str(tmp_path / "sc")]
    assert main(argv + ["--image_dir", str(tmp_path / "coco"), "--output_file", str(out), "--no_progress"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    categories = pb.load_sugarcrepe(tmp_path / "sc", tmp_path / "coco")
    expected = {name: pb.evaluate_pairwise(scorer, samples) for name, samples in categories.items()}
    assert metrics == {**expected, "mean": pytest.approx((expected["replace_att"] + expected["swap_obj"]) / 2)}

    wino = tmp_path / "winoground"
    _image(wino / "images" / "ex_0_img_0.png", (200, 30, 30))
    _image(wino / "images" / "ex_0_img_1.png", (30, 30, 200))
    row = {"id": 0, "image_0": "ex_0_img_0", "image_1": "ex_0_img_1", "caption_0": "red", "caption_1": "blue"}
    (wino / "examples.jsonl").write_text(json.dumps(row) + "\n")
    out = tmp_path / "wino.json"
    argv = ["--model_dir", str(tmp_path / "clip"), "--benchmark", "winoground", "--data_dir", str(wino)]
    assert main(argv + ["--output_file", str(out), "--no_progress"]) == 0
    assert json.loads(out.read_text())["metrics"] == pb.evaluate_winoground(scorer, pb.load_winoground(wino))
    argv = ["--model_dir", str(tmp_path / "clip"), "--benchmark", "refcoco", "--data_dir", str(wino)]
    assert main(argv + ["--image_dir", str(wino)]) == 2  # grounding needs CLOC
