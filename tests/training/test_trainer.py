"""The Accelerate trainer end to end on a tiny generated dataset: outputs load, exact resume, LoRA, frozen towers,
Hub upload folder, and clear errors for bad data and mismatched checkpoints."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor, pipeline

import modeling_cloc  # noqa: F401  (registers the models for AutoModel)
import modeling_occlip  # noqa: F401
from examples import train_clip, train_cloc, train_occlip
from modeling_cloc import CLOCModel
from modeling_occlip import OCCLIPModel
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, random_pixels, tiny_vision_config
from tests.isolated_python import run_isolated
from tests.training_fixtures import write_dataset, write_model_config
from training import trainer as trainer_module
from training.data import TrainingCollator, load_image_text_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
MAINS = {"clip": train_clip.main, "occlip": train_occlip.main, "cloc": train_cloc.main}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), rows=8)


def run(family, data, out, *extra, config=None):
    argv = ["--train_data", str(data), "--output_dir", str(out), "--per_device_train_batch_size", "4"]
    argv += ["--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "1e-3"]
    if config is not None:
        argv += ["--model_config", str(config)]
    return MAINS[family]([*argv, *extra])


@pytest.mark.parametrize("family", ["clip", "occlip", "cloc"])
def test_from_scratch_output_folder_loads_and_learns(family, data, tmp_path):
    config = write_model_config(tmp_path / "config.json", family)
    metrics = run(family, data, tmp_path / "out", "--max_steps", "6", config=config)
    assert metrics["skipped_rows"] == 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    model = AutoModel.from_pretrained(tmp_path / "out")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == {"clip": "CLIPModel", "occlip": "OCCLIPModel", "cloc": "CLOCModel"}[family]
    assert type(processor).__name__.startswith({"clip": "CLIP", "occlip": "OCCLIP", "cloc": "CLOC"}[family])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## How to load" in card and "AutoModel.from_pretrained" in card and f"- {family}" in card
    assert f"| loss | {metrics['loss']:.4g} |" in card


def test_resume_continues_bit_for_bit(data, tmp_path):
    """Stop after step 2 (keep only that checkpoint), resume: the final weights equal an uninterrupted run."""
    config = write_model_config(tmp_path / "config.json", "occlip")
    common = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    run("occlip", data, tmp_path / "straight", *common, config=config)
    run("occlip", data, tmp_path / "interrupted", *common, "--checkpointing_steps", "2", config=config)
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_2", "checkpoint_4"]
    shutil.rmtree(checkpoints / "checkpoint_4")  # as if killed between steps 2 and 4
    (tmp_path / "interrupted" / "model.safetensors").unlink()
    resume = ["--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"]
    run("occlip", data, tmp_path / "interrupted", *common, *resume, config=config)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert (checkpoints / "checkpoint_4").is_dir()  # the resumed run saved its next checkpoint


def test_resume_with_a_different_model_config_is_a_clear_error(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    run("clip", data, tmp_path / "out", "--max_steps", "1", "--checkpointing_steps", "1", config=config)
    other = json.loads(config.read_text())
    other["projection_dim"] = 16
    other["text_config"]["projection_dim"] = other["vision_config"]["projection_dim"] = 16
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"different model config \(differs in \['projection_dim'"):
        run(
            "clip",
            data,
            tmp_path / "out",
            "--max_steps",
            "2",
            "--resume_from_checkpoint",
            "latest",
            config=tmp_path / "other.json",
        )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    from transformers import CLIPConfig, CLIPImageProcessorPil

    config = CLIPConfig(text_config=clip_vocab_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=bundled_clip_tokenizer()).save_pretrained(folder)
    return folder


def from_clip(clip_folder, mode: str, steps: int) -> list[str]:
    """Flags for fine-tuning from the tiny CLIP folder."""
    return ["--init_from", str(clip_folder), "--finetune_mode", mode, "--max_steps", str(steps)]


def initial_occlip(clip_folder) -> OCCLIPModel:
    """The model the trainer starts from (same seed, same construction)."""
    set_seed(0)
    return OCCLIPModel.from_clip(CLIPModel.from_pretrained(clip_folder))


def test_lora_trains_only_adapters_and_saved_modules(data, clip_folder, tmp_path):
    from peft import PeftModel

    run("occlip", data, tmp_path / "out", *from_clip(clip_folder, "lora", steps=3))
    start = initial_occlip(clip_folder).state_dict()
    merged = AutoModel.from_pretrained(tmp_path / "out").eval()
    end = merged.state_dict()
    lora_targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    saved = ("binding.", "similarity.", "visual_projection.", "text_projection.", "logit_scale")
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert any(k.startswith("binding.") for k in changed) and any(k.startswith("text_model.") for k in changed)
    for name in changed:  # towers change only where LoRA merged into a target linear layer
        assert name.startswith(saved) or name.rsplit(".", 2)[-2] in lora_targets, name
    assert not any("layer_norm" in k or "embeddings" in k for k in changed)
    # The adapter folder reloads onto the starting model and reproduces the merged model's outputs.
    adapted = PeftModel.from_pretrained(initial_occlip(clip_folder), tmp_path / "out" / "adapter").eval()
    pixels = random_pixels(2, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(
            adapted.get_image_features(pixels).binding_keys,
            merged.get_image_features(pixels).binding_keys,
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("family", ["occlip", "cloc"])
def test_lora_adapter_on_the_base_model_reproduces_the_merged_model(family, data, clip_folder, tmp_path):
    """The adapter holds the trained logit scales too (bare parameters, outside LoRA and modules_to_save)."""
    from peft import PeftModel

    run(family, data, tmp_path / "out", *from_clip(clip_folder, "lora", steps=3))
    merged = AutoModel.from_pretrained(tmp_path / "out").eval()
    set_seed(0)  # the trainer's starting model: same seed, same construction
    start = {"occlip": OCCLIPModel, "cloc": CLOCModel}[family].from_clip(CLIPModel.from_pretrained(clip_folder))
    scales = ["logit_scale", "region_logit_scale"] if family == "cloc" else ["logit_scale"]
    assert all(not torch.equal(getattr(start, n), getattr(merged, n)) for n in scales)  # they trained
    adapted = PeftModel.from_pretrained(start, tmp_path / "out" / "adapter").eval()
    for name in scales:
        assert torch.equal(getattr(adapted.base_model.model, name), getattr(merged, name)), name
    ids = bundled_clip_tokenizer()(["a red square", "a blue square"], padding=True, return_tensors="pt")
    pixels = random_pixels(2, seed=1)
    with torch.no_grad():
        if family == "cloc":
            torch.testing.assert_close(
                adapted(pixel_values=pixels, **ids).logits_per_image,
                merged(pixel_values=pixels, **ids).logits_per_image,
                atol=1e-5,
                rtol=1e-5,
            )
        unmerged = adapted.merge_and_unload().state_dict()
    end = merged.state_dict()
    assert unmerged.keys() == end.keys()
    for name in end:
        torch.testing.assert_close(unmerged[name], end[name], atol=1e-5, rtol=1e-5, msg=name)


def test_frozen_towers_stay_unchanged(data, clip_folder, tmp_path):
    run("occlip", data, tmp_path / "out", *from_clip(clip_folder, "frozen", steps=2))
    start = initial_occlip(clip_folder).state_dict()
    end = AutoModel.from_pretrained(tmp_path / "out").state_dict()
    towers = [
        k for k in start if k.startswith(("text_model.", "vision_model.", "visual_projection", "text_projection"))
    ]
    assert len(towers) > 30 and all(torch.equal(start[k], end[k]) for k in towers)
    assert not torch.equal(start["logit_scale"], end["logit_scale"])  # the temperature trains with the new modules
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("binding."))


@pytest.mark.slow
def test_push_to_hub_uploads_the_final_folder(data, tmp_path, monkeypatch, clean_python):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False):
            calls.append(("create_repo", repo_id))

        def upload_folder(self, repo_id, folder_path, ignore_patterns=None):
            calls.append(("upload_folder", repo_id, folder_path, ignore_patterns))
            return "https://hub.example/commit/1"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    config = write_model_config(tmp_path / "config.json", "cloc")
    out = tmp_path / "out"
    run(
        "cloc",
        data,
        out,
        "--max_steps",
        "1",
        "--checkpointing_steps",
        "1",
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "someone/cloc-tiny",
        config=config,
    )
    assert calls == [
        ("create_repo", "someone/cloc-tiny"),
        ("upload_folder", "someone/cloc-tiny", str(out), ["checkpoints/*"]),
    ]
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "modeling_cloc.py", "processor_config.json"} <= files
    assert "AutoModel" in json.loads((out / "config.json").read_text())["auto_map"]
    run_isolated(
        clean_python,
        f"""
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(out)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert type(model).__name__ == "CLOCModel" and type(processor).__name__ == "CLOCProcessor"
        """,
        tmp_path,
    )


def test_bad_rows_are_skipped_and_counted_or_named(tmp_path):
    data = write_dataset(tmp_path / "data", rows=8, bad_rows=2)
    config = write_model_config(tmp_path / "config.json", "clip")
    skip = ["--max_steps", "2", "--per_device_train_batch_size", "5", "--on_bad_sample", "skip"]
    metrics = run("clip", data, tmp_path / "out", *skip, config=config)
    assert metrics["skipped_rows"] == 2  # two batches of 5 see all 10 rows once
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    rows[0]["scene_graph"] = {"objects": [{"name": "square", "attributes": []}], "relations": [{"subject": 0}]}
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    occlip_config = write_model_config(tmp_path / "occlip.json", "occlip")
    metrics = run("occlip", data, tmp_path / "out3", *skip, config=occlip_config)
    assert metrics["skipped_rows"] == 3  # the two unreadable images and the malformed cached scene graph
    collator = TrainingCollator(AutoProcessor.from_pretrained(tmp_path / "out3"), "occlip")
    with pytest.raises(ValueError, match=r"row 0 \(000\.png\): malformed scene_graph \(.*relation"):
        collator([{**load_image_text_dataset(str(data))[0], "__index__": 0}])
    with pytest.raises(ValueError, match=r"row \d+ \(bad\d\.png\): unreadable image"):
        run("clip", data, tmp_path / "out2", "--max_steps", "2", config=config)


def test_empty_dataset_and_missing_caption_are_clear_errors(tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="metadata.jsonl is empty"):
        run("clip", tmp_path / "empty", tmp_path / "out", "--max_steps", "1", config=config)
    data = write_dataset(tmp_path / "nocaption", rows=2)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"]}) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"no caption column .caption. \(columns: \[.image.\]\)"):
        run("clip", data, tmp_path / "out", "--max_steps", "1", config=config)
    with pytest.raises(ValueError, match="fp16 does not combine with --gradient_accumulation_steps"):
        run("clip", data, tmp_path / "out", "--mixed_precision", "fp16", "--gradient_accumulation_steps", "2")
    with pytest.raises(ValueError, match="pass --model_config .* or --init_from"):
        run("clip", write_dataset(tmp_path / "ok", rows=4), tmp_path / "out", "--max_steps", "1")
    assert trainer_module.ContrastiveTrainingArguments.__dataclass_fields__["output_dir"].metadata["help"]


@pytest.mark.slow
def test_two_process_run_with_accumulation_resumes_and_loads(tmp_path):
    """`torchrun --nproc_per_node 2` (gloo, CPU): CLOC with local loss and cached-feature accumulation trains,
    checkpoints, resumes in the same output folder, and the result loads."""
    import os
    import socket
    import subprocess
    import sys

    data = write_dataset(tmp_path / "data", rows=16)
    config = write_model_config(tmp_path / "config.json", "cloc")
    out = tmp_path / "out"
    with socket.socket() as probe:  # a free port: the default one may be held by another run
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    command += ["examples/train_cloc.py"]
    command += ["--train_data", str(data), "--model_config", str(config), "--output_dir", str(out)]
    command += ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--local_loss", "true"]
    command += ["--checkpointing_steps", "2", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = REPO_ROOT
    for steps, extra in (("2", []), ("4", ["--resume_from_checkpoint", "latest"])):
        result = subprocess.run(
            [*command, "--max_steps", steps, *extra], cwd=root, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_2", "checkpoint_4"]
    # One run of two processes, not two single-process runs (accelerate needs `cpu=True` to set up gloo on CPU).
    state = json.loads((out / "checkpoints" / "checkpoint_4" / "trainer_state.json").read_text())
    assert state["run_shape"]["num_processes"] == 2
    assert type(AutoModel.from_pretrained(out)).__name__ == "CLOCModel"


def test_streaming_run_trains_and_resumes_exactly(data, tmp_path):
    config = write_model_config(tmp_path / "config.json", "clip")
    common = ["--streaming", "true", "--shuffle_buffer_size", "4", "--max_steps", "4"]
    common += ["--per_device_train_batch_size", "2", "--checkpointing_steps", "2"]
    run("clip", data, tmp_path / "straight", *common, config=config)
    run("clip", data, tmp_path / "resumed", *common, config=config)
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "checkpoint_4")
    run("clip", data, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest", config=config)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        run("clip", data, tmp_path / "x", "--streaming", "true", config=config)


def test_clip_hard_negatives_collate_train_and_name_missing_rows(tmp_path):
    data = write_dataset(tmp_path / "data", rows=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        colour = row["caption"].split()[1]
        row["negatives"] = {"shape_replace": f"a {colour} circle", "colour_replace": f"a pink {row['caption'][2:]}"}
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_model_config(tmp_path / "config.json", "clip")
    metrics = run("clip", data, tmp_path / "out", "--max_steps", "2", "--hard_negatives", "true", config=config)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    dataset = load_image_text_dataset(str(data))
    batch = TrainingCollator(processor, "clip", hard_negatives=True)([{**dataset[i], "__index__": i} for i in (2, 3)])
    # Kinds in sorted order, taken in turn by row index: row 2 -> colour_replace, row 3 -> shape_replace.
    texts = [rows[2]["caption"], rows[3]["caption"], rows[2]["negatives"]["colour_replace"], "a yellow circle"]
    expected = processor.tokenizer(texts, padding=True, return_tensors="pt")["input_ids"]
    assert rows[3]["caption"] == "a yellow square" and torch.equal(batch["input_ids"], expected)
    rows[5].pop("negatives")
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"row 5 \(005\.png\): no hard-negative caption"):
        run("clip", data, tmp_path / "out2", "--max_steps", "2", "--hard_negatives", "true", config=config)
    with pytest.raises(ValueError, match="--hard_negatives is the CLIP baseline's option"):
        run("occlip", data, tmp_path / "out3", "--max_steps", "1", "--hard_negatives", "true", config=config)


def test_periodic_evaluation_logs_the_metrics_of_the_model_at_that_step(data, tmp_path, capsys):
    from training.evaluation import ImageTextScorer, evaluate_rows

    config = write_model_config(tmp_path / "config.json", "occlip")
    extra = ["--max_steps", "3", "--eval_data", str(data), "--eval_steps", "2", "--eval_max_samples", "6"]
    metrics = run("occlip", data, tmp_path / "out", *extra, config=config)
    printed = capsys.readouterr().out
    assert "step 2: eval/image_to_text_R@1" in printed and "step 3: eval/image_to_text_R@1" in printed
    rows = list(load_image_text_dataset(str(data)))[:6]
    scorer = ImageTextScorer(
        AutoModel.from_pretrained(tmp_path / "out"), AutoProcessor.from_pretrained(tmp_path / "out"), "occlip"
    )
    expected = evaluate_rows(scorer, rows)
    assert {k: metrics[f"eval/{k}"] for k in expected} == pytest.approx(expected)
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]  # --logging_steps 1
    evaluated = [r for r in history if "eval/image_to_text_R@1" in r]
    assert [r["step"] for r in evaluated] == [2, 3]
    assert {k: evaluated[-1][f"eval/{k}"] for k in expected} == pytest.approx(expected)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty/metadata.jsonl is empty: no rows"):
        run(
            "occlip",
            data,
            tmp_path / "out2",
            "--max_steps",
            "1",
            "--eval_data",
            str(tmp_path / "empty"),
            config=config,
        )


def test_model_config_with_init_from_sets_only_the_new_modules(data, clip_folder, tmp_path):
    """Fine-tuning from CLIP with --model_config: the new modules take its settings, the towers the checkpoint's."""
    settings = tmp_path / "occlip.json"
    settings.write_text(json.dumps({"binding_config": {"num_default_queries": 2}, "rel_loss_weight": 0.5}))
    run("occlip", data, tmp_path / "out", *from_clip(clip_folder, "full", steps=1), config=settings)
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.binding_config.num_default_queries == 2 and model.config.rel_loss_weight == 0.5
    assert (
        model.config.vision_config.hidden_size
        == CLIPModel.from_pretrained(clip_folder).config.vision_config.hidden_size
    )
    cloc_settings = tmp_path / "cloc.json"
    cloc_settings.write_text(json.dumps({"region_head": "roi_align", "prompter_config": {"vision_feature_layer": 1}}))
    run("cloc", data, tmp_path / "cloc", *from_clip(clip_folder, "full", steps=1), config=cloc_settings)
    cloc = AutoModel.from_pretrained(tmp_path / "cloc")
    assert cloc.roi_head is not None and cloc.config.prompter_config.vision_feature_layer == 1
    towers = tmp_path / "towers.json"
    towers.write_text(json.dumps({"vision_config": {"hidden_size": 64, "patch_size": 8}, "projection_dim": 12}))
    with pytest.raises(
        ValueError,
        match=r"contradicts the CLIP towers of --init_from .*: vision_config.hidden_size 64 "
        r"\(checkpoint: 32\), projection_dim 12 \(checkpoint: 24\); with --init_from",
    ):
        run("occlip", data, tmp_path / "bad", *from_clip(clip_folder, "full", steps=1), config=towers)
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="a CLIP model lacks nothing: \\['binding_config', 'rel_loss_weight'\\]"):
        run("clip", data, tmp_path / "bad2", *from_clip(clip_folder, "full", steps=1), config=settings)


def test_init_from_with_model_config_loads_the_clip_weights_and_the_new_module_settings(data, clip_folder, tmp_path):
    """Tower settings that repeat the checkpoint's are accepted; with frozen towers the trained model's towers are
    the CLIP checkpoint's weights, and the binding module has the requested shape."""
    settings = tmp_path / "occlip.json"
    binding = {"num_hidden_layers": 1, "num_default_queries": 3}
    settings.write_text(
        json.dumps({"binding_config": binding, "rel_loss_weight": 0.25, "vision_config": {"patch_size": 8}})
    )
    run("occlip", data, tmp_path / "out", *from_clip(clip_folder, "frozen", steps=1), config=settings)
    model = AutoModel.from_pretrained(tmp_path / "out")
    assert model.config.binding_config.num_hidden_layers == 1 and model.config.binding_config.num_default_queries == 3
    assert model.config.rel_loss_weight == 0.25 and len(model.binding.layers) == 1
    clip = CLIPModel.from_pretrained(clip_folder).state_dict()
    trained = model.state_dict()
    towers = [
        k for k in clip if k.startswith(("text_model.", "vision_model.", "visual_projection.", "text_projection."))
    ]
    assert towers and all(torch.equal(trained[k], clip[k]) for k in towers)


def test_report_to_tensorboard_writes_the_logged_metrics(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_model_config(tmp_path / "config.json", "clip")
    out = tmp_path / "out"
    run("clip", data, out, "--max_steps", "2", "--report_to", "tensorboard", config=config)
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {out}: {sorted(p.name for p in out.rglob('*'))}"
    history = json.loads((out / "log_history.json").read_text())
    logged = {}
    for path in {p.parent for p in events}:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            logged[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    assert [step for step, _ in logged["loss"]] == [1, 2]
    for (step, value), record in zip(logged["loss"], history):
        assert record["step"] == step and value == pytest.approx(record["loss"], rel=1e-6)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_tracker_is_an_error_naming_the_extra_before_training(tracker, data, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else find_spec(name, *a))
    config = write_model_config(tmp_path / "config.json", "clip")
    with pytest.raises(ImportError, match=rf"--report_to {tracker}: .*occlip-cloc\[{tracker}\]"):
        run("clip", data, tmp_path / "out", "--max_steps", "2", "--report_to", tracker, config=config)
    assert not (tmp_path / "out").exists()  # refused before anything was written or trained
    with pytest.raises(ValueError, match="unknown tracker"):
        run("clip", data, tmp_path / "out", "--max_steps", "2", "--report_to", "tensorbord", config=config)


@pytest.fixture(scope="module")
def cached_clip_folder(clip_folder, tmp_path_factory):
    """The tiny CLIP folder as a Hub-cache snapshot of `someone/clip-tiny` with an MIT card."""
    folder = tmp_path_factory.mktemp("hub") / "models--someone--clip-tiny" / "snapshots" / "0123abc"
    shutil.copytree(clip_folder, folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# tiny CLIP\n")
    return folder


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["clip", "occlip", "cloc"])
def test_model_card_metadata_is_true_and_its_snippet_runs(family, data, cached_clip_folder, tmp_path):
    from huggingface_hub import ModelCard
    from PIL import Image

    out = tmp_path / "out"
    metrics = run(family, data, out, *from_clip(cached_clip_folder, "full", steps=1), "--eval_data", str(data))
    card = ModelCard.load(out / "README.md")
    meta = card.data
    assert meta.library_name == "transformers" and meta.license == "mit" and meta.base_model == "someone/clip-tiny"
    assert family in meta.tags and meta.datasets is None  # a local training folder names no Hub dataset
    # OC-CLIP is not a zero-shot image classifier; CLIP and CLOC are, and the pipeline runs on the folder.
    assert meta.pipeline_tag == (None if family == "occlip" else "zero-shot-image-classification")
    results = {r.metric_type: r for r in meta.eval_results}
    assert results["image_to_text_R@1"].metric_value == pytest.approx(metrics["eval/image_to_text_R@1"])
    assert results["image_to_text_R@1"].task_type == "image-text-retrieval"
    assert results["image_to_text_R@1"].dataset_name == data.name
    if family == "cloc":
        assert results["region_classification"].metric_value == pytest.approx(metrics["eval/region_classification"])
    if meta.pipeline_tag:
        classifier = pipeline(meta.pipeline_tag, model=str(out))
        scores = classifier(Image.new("RGB", (40, 40), "red"), candidate_labels=["red square", "blue square"])
        assert len(scores) == 2 and sum(s["score"] for s in scores) == pytest.approx(1.0)
    # The card's snippet, run literally in a fresh interpreter (only the folder path filled in).
    (snippet,) = python_blocks(card.text)
    assert "PATH_OR_REPO" in snippet
    code = snippet.replace("PATH_OR_REPO", str(out))
    code += '\ntorch.save(dict(inputs), "inputs.pt")\ntorch.save(model(**inputs).logits_per_image, "logits.pt")\n'
    (tmp_path / "snippet.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    inputs = torch.load(tmp_path / "inputs.pt")
    model = AutoModel.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model(**inputs).logits_per_image
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-6, rtol=1e-6)
    assert expected.shape == (1, 2)


def test_hub_ids_of_the_card_come_only_from_hub_names(tmp_path):
    from training.model_card import hub_id

    assert hub_id("laion/relaion2B-en", "datasets") == "laion/relaion2B-en"
    assert hub_id(str(tmp_path)) is None  # a plain local folder is no Hub id
    cached = tmp_path / "datasets--someone--pairs" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert hub_id(str(cached), "datasets") == "someone/pairs"
    assert hub_id("not a repo id") is None


def test_disable_tqdm_prints_progress_lines_with_the_logged_values(data, tmp_path, capsys):
    """Without a bar (a log file, a batch job) each logged step prints step, loss, LR and samples/s to stdout."""
    config = write_model_config(tmp_path / "config.json", "clip")
    run("clip", data, tmp_path / "out", "--max_steps", "2", config=config)  # --logging_steps 1 --disable_tqdm
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert len(lines) == 2 and [r["step"] for r in history] == [1, 2]
    for line, record in zip(lines, history):
        found = re.fullmatch(r"step (\d+)/2: loss ([\d.]+), lr ([\d.e+-]+), samples/s ([\d.]+)", line)
        assert found, line
        assert int(found[1]) == record["step"]
        assert float(found[2]) == pytest.approx(record["loss"], abs=1e-4)
        assert float(found[3]) == pytest.approx(record["lr"], rel=1e-2)
        assert float(found[4]) == pytest.approx(record["samples_per_second"], abs=0.051)


@pytest.mark.parametrize("family", ["occlip", "cloc"])
def test_a_saved_model_config_that_repeats_the_towers_is_not_a_contradiction(clip_folder, family):
    """A user's --model_config is often a saved OC-CLIP / CLOC config.json: its towers carry their own model_type and
    bookkeeping keys, which do not contradict the CLIP checkpoint; a real tower setting still does."""
    from modeling_cloc import CLOCModel
    from modeling_occlip import OCCLIPModel
    from training.trainer import new_module_settings

    clip = CLIPModel.from_pretrained(clip_folder)
    model_class = OCCLIPModel if family == "occlip" else CLOCModel
    values = model_class.from_clip(clip).config.to_dict()
    assert values["vision_config"]["model_type"] != clip.config.vision_config.model_type
    kept = new_module_settings(values, clip.config, "cfg.json", str(clip_folder))
    assert not set(kept) & {"text_config", "vision_config", "projection_dim"}
    assert kept["logit_scale_max"] == values["logit_scale_max"]
    values["vision_config"]["patch_size"] = 4
    with pytest.raises(ValueError, match=r"vision_config.patch_size 4 \(checkpoint: "):
        new_module_settings(values, clip.config, "cfg.json", str(clip_folder))
