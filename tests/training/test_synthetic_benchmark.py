"""A short end-to-end run of the synthetic benchmark demo (tiny towers, a few steps)."""

import json

import pytest
from PIL import Image
from transformers import AutoModel, AutoProcessor

from training import synthetic_benchmark


def test_demo_pipeline_writes_results_models_and_pictures(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path), "--num_images", "40", "--base_steps", "2", "--max_steps", "2"]
    argv += ["--width", "32", "--layers", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"]
    argv += ["--eval_max_samples", "8", "--curve_points", "2"]
    results = synthetic_benchmark.main(argv)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    models = {"base_clip", "clip", "clip_hard_negatives", "occlip", "cloc", "cloc_roi", "clip_crop"}
    assert set(results) == models
    splits = {"seen", "unseen", "seen_plain", "unseen_plain"}
    pairs = {"attribute_swap", "relation_swap", "shape_replace", "colour_replace"}
    for name in ("base_clip", "clip", "clip_hard_negatives", "occlip"):
        assert splits <= set(results[name]) and pairs <= set(results[name]["unseen_plain"])
    assert {"region_classification", "grounding_acc50"} <= set(results["cloc"]["unseen"])
    assert set(results["clip_crop"]["seen"]) == {"region_classification"}
    diagnostics = results["occlip"]["diagnostics"]
    assert {"binding_mass_own_box", "binding_mass_other_boxes", "relation_loss_chance", "relation_loss_final"} <= set(
        diagnostics
    )
    assert {"probe_slots/centre_r2", "probe_patch_tokens/shape_accuracy"} <= set(diagnostics)
    assert {"prompter_mass_in_box", "prompter_mass_cls", "probe_region_embeds/colour_accuracy"} <= set(
        results["cloc"]["diagnostics"]
    )
    for name, splits_of in results.items():
        for split, values in splits_of.items():
            if split != "diagnostics":
                assert all(0 <= v <= 1 for v in values.values()), (name, split)
    # Every fine-tuned model starts from the base: same towers config, and the base is trained once.
    base = json.loads((tmp_path / "base_clip" / "config.json").read_text())
    for name in ("clip", "clip_hard_negatives", "occlip", "cloc", "cloc_roi"):
        model = AutoModel.from_pretrained(tmp_path / name)
        assert type(model).__name__.lower().startswith(name.split("_")[0][:4])
        assert model.config.vision_config.hidden_size == base["vision_config"]["hidden_size"]
        AutoProcessor.from_pretrained(tmp_path / name)
    curves = json.loads((tmp_path / "learning_curves.json").read_text())
    assert {"base_clip", "clip", "occlip", "cloc"} <= set(curves)
    assert [step for step, _ in curves["occlip"]["attribute_swap"]] == [3, 4]  # after the base's 2 steps
    for picture in ("results.png", "binding_maps.png", "learning_curves.png"):
        with Image.open(tmp_path / picture) as image:  # matplotlib PNGs (the dev extra includes it)
            assert image.format == "PNG" and min(image.size) > 300, picture
    out = capsys.readouterr().out
    assert "targets:" in out and "occlip diagnostics:" in out and "cloc diagnostics:" in out
    # A second run with the same settings reuses the base CLIP instead of training it again.
    weights = (tmp_path / "base_clip" / "model.safetensors").stat().st_mtime_ns
    synthetic_benchmark.main(argv + ["--models", "base_clip", "clip"])
    assert (tmp_path / "base_clip" / "model.safetensors").stat().st_mtime_ns == weights
    assert "reusing the base CLIP" in capsys.readouterr().out


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
