"""A short end-to-end run of the synthetic benchmark demo (tiny towers, a few steps)."""

import json

import pytest
from transformers import AutoModel, AutoProcessor

from examples import synthetic_benchmark


def test_demo_pipeline_writes_results_models_and_pictures(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--num_images", "40", "--max_steps", "2", "--width", "32"]
    argv += ["--layers", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]
    results = synthetic_benchmark.main(argv)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert set(results) == {"clip", "clip_hard_negatives", "occlip", "cloc", "cloc_roi", "clip_crop"}
    pairs = {"attribute_swap", "relation_swap", "shape_replace", "colour_replace"}
    for name in ("clip", "clip_hard_negatives", "occlip"):
        assert set(results[name]) == {"seen", "unseen"} and pairs <= set(results[name]["unseen"])
    assert {"region_classification", "grounding_acc50"} <= set(results["cloc"]["unseen"])
    assert set(results["clip_crop"]["seen"]) == {"region_classification"}
    assert all(0 <= v <= 1 for splits in results.values() for m in splits.values() for v in m.values())
    for name in ("clip", "clip_hard_negatives", "occlip", "cloc", "cloc_roi"):
        assert type(AutoModel.from_pretrained(tmp_path / name)).__name__.lower().startswith(name.split("_")[0][:4])
        AutoProcessor.from_pretrained(tmp_path / name)
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "binding_maps.png").stat().st_size > 0
    assert "targets:" in capsys.readouterr().out


def test_full_mode_summary_is_mean_and_std_over_seeds(capsys):
    runs = [
        {"occlip": {"unseen": {"attribute_swap": 0.5, "relation_swap": 0.25}}},
        {"occlip": {"unseen": {"attribute_swap": 0.7, "relation_swap": 0.25}}},
        {"occlip": {"unseen": {"attribute_swap": 0.9, "relation_swap": 0.25}}},
    ]
    summary = synthetic_benchmark.summarise(runs)["occlip"]["unseen"]
    # mean 0.7; sample std of (0.5, 0.7, 0.9) = sqrt((0.04 + 0 + 0.04) / 2) = 0.2
    assert summary["attribute_swap"] == pytest.approx(0.7) and summary["attribute_swap_std"] == pytest.approx(0.2)
    assert summary["relation_swap"] == pytest.approx(0.25) and summary["relation_swap_std"] == pytest.approx(0.0)
    assert "attribute_swap_std" not in synthetic_benchmark.summarise(runs[:1])["occlip"]["unseen"]
    table = synthetic_benchmark.print_table({"occlip": {"unseen": summary}})
    assert "0.700±0.200" in table and "0.250±0.000" in table
