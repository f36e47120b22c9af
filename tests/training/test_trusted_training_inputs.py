"""The trainer trusts the processor's OC-CLIP batches (no per-batch scene-graph checks, so no host syncs on the hot
path) and nothing else: the loss is the same either way, hand-made batches keep the checks, shape errors are still
named, and the tokenizer is checked against the text tower once per run instead."""

import pytest
import torch
from PIL import Image

from examples import train_occlip
from modeling_occlip import OCCLIPConfig, OCCLIPModel
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, tiny_binding_config, tiny_text_config, tiny_vision_config
from tests.training_fixtures import write_dataset, write_model_config
from training.families import get_family
from training.step import ContrastiveTrainingModule
from training.trainer import check_tokenizer_fits, default_processor

CAPTIONS = ["a red cube left of a blue ball", "a green cone", "a small dog on a large sofa", "two red cubes"]


def tiny_model() -> OCCLIPModel:
    torch.manual_seed(0)
    config = OCCLIPConfig(
        text_config=clip_vocab_text_config(),
        vision_config=tiny_vision_config(),
        binding_config=tiny_binding_config(),
        projection_dim=24,
    )
    return OCCLIPModel(config)


def processor_batch() -> dict:
    """A training batch as `TrainingCollator` makes it: the OC-CLIP family's `model_inputs` over the processor."""
    family = get_family("occlip")
    processor = default_processor(family, 32)
    colours = ["red", "blue", "green", "white"]
    rows = [
        {"image": Image.new("RGB", (40, 36), c), "caption": t, "scene_graph": None} for c, t in zip(colours, CAPTIONS)
    ]
    return family.model_inputs(processor, rows)


def refuse(*args, **kwargs):
    raise AssertionError("the value checks ran on a trusted batch")


def test_trusted_batches_skip_the_value_checks_and_give_the_same_loss(monkeypatch):
    model, batch = tiny_model(), processor_batch()
    objective = get_family("occlip").objective()
    checked = ContrastiveTrainingModule(model, objective)
    trusted = ContrastiveTrainingModule(model, objective, trusted_inputs=True)
    assert objective.forward_kwargs()["validate_inputs"] is True  # the default keeps the checks
    torch.manual_seed(1)
    loss_checked, parts_checked, _ = checked(batch)
    loss_checked.backward()
    grad_checked = model.binding.layers[0].k_proj.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(OCCLIPModel, "_check_node_values", refuse)
    torch.manual_seed(1)
    loss_trusted, parts_trusted, _ = trusted(batch)
    loss_trusted.backward()
    assert torch.equal(loss_trusted, loss_checked)
    assert parts_trusted.keys() == parts_checked.keys()
    for name in parts_checked:
        assert torch.equal(parts_trusted[name], parts_checked[name]), name
    assert torch.equal(model.binding.layers[0].k_proj.weight.grad, grad_checked)
    # An untrusted module (hand-made batches) still runs them.
    with pytest.raises(AssertionError, match="value checks ran"):
        checked(batch)


def test_trusted_batches_keep_the_sync_free_shape_checks():
    model, batch = tiny_model(), processor_batch()
    trusted = ContrastiveTrainingModule(model, get_family("occlip").objective(), trusted_inputs=True)
    too_long = model.config.text_config.max_position_embeddings + 1
    bad = {**batch, "node_input_ids": torch.nn.functional.pad(batch["node_input_ids"], (0, too_long))}
    bad["node_attention_mask"] = torch.nn.functional.pad(batch["node_attention_mask"], (0, too_long))
    with pytest.raises(ValueError, match="node_input_ids has .* tokens per phrase, more than"):
        trusted(bad)
    with pytest.raises(ValueError, match="relation_mask has shape"):
        trusted({**batch, "relation_mask": batch["relation_mask"][:, :0]})
    # A malformed value is the trainer's to prevent: with the checks on, it is named.
    wrong = {**batch, "relation_object_index": batch["relation_object_index"].clone()}
    wrong["relation_object_index"][0, 0] = 9
    checked = ContrastiveTrainingModule(model, get_family("occlip").objective())
    with pytest.raises(ValueError, match="relation_object_index = 9 does not point to a valid node"):
        checked(wrong)


def test_tokenizer_is_checked_against_the_text_tower_once_per_run():
    from transformers import CLIPTextConfig

    tokenizer = bundled_clip_tokenizer()
    check_tokenizer_fits(tokenizer, CLIPTextConfig(**clip_vocab_text_config()))
    with pytest.raises(
        ValueError, match=r"the tokenizer has 49408 tokens, more than the text tower's vocab_size \(100\)"
    ):
        check_tokenizer_fits(tokenizer, CLIPTextConfig(**tiny_text_config()))
    with pytest.raises(ValueError, match="end-of-text token is 49407, the text tower pools at 49406"):
        check_tokenizer_fits(tokenizer, CLIPTextConfig(**{**clip_vocab_text_config(), "eos_token_id": 49406}))
    # Early CLIP configs' eos_token_id=2 makes the tower pool at the highest id: nothing to compare.
    check_tokenizer_fits(tokenizer, CLIPTextConfig(**{**clip_vocab_text_config(), "eos_token_id": 2}))


def test_the_trainer_runs_oc_clip_without_the_value_checks(tmp_path, monkeypatch):
    """End to end: the trainer's batches come from the collator, so the per-batch value checks never run; a model
    config whose vocabulary the tokenizer overflows is refused before training."""
    data = write_dataset(tmp_path / "data", rows=4)
    config = write_model_config(tmp_path / "config.json", "occlip")
    argv = ["--train_data", str(data), "--model_config", str(config), "--per_device_train_batch_size", "4"]
    argv += ["--max_steps", "1", "--disable_tqdm", "true"]
    monkeypatch.setattr(OCCLIPModel, "_check_node_values", refuse)
    metrics = train_occlip.main([*argv, "--output_dir", str(tmp_path / "out")])
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    small = config.read_text().replace('"vocab_size": 49408', '"vocab_size": 1000')
    (tmp_path / "small.json").write_text(small)
    argv[argv.index(str(config))] = str(tmp_path / "small.json")
    with pytest.raises(ValueError, match=r"more than the text tower's vocab_size \(1000\)"):
        train_occlip.main([*argv, "--output_dir", str(tmp_path / "small_out")])
