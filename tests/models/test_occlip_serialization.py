"""OC-CLIP save/load: round trip, Auto classes, remote code without the package, CLIP parity, vision tower."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, CLIPVisionModel

from modeling_occlip import OCCLIPModel, OCCLIPVisionConfig, OCCLIPVisionModel
from tests.factories import encode_graphs, example_graphs, random_pixels, tiny_clip_model, tiny_occlip_model
from tests.isolated_python import run_isolated


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny trained-looking OC-CLIP saved to a folder, with inputs and reference logits."""
    folder = tmp_path_factory.mktemp("occlip")
    model = tiny_occlip_model(seed=7)
    with torch.no_grad():  # move alpha/beta and the logit scale off their init so the round trip is informative
        model.similarity.log_alpha.fill_(0.3)
        model.similarity.log_beta.fill_(-0.2)
        model.logit_scale.fill_(3.0)
    inputs = dict(pixel_values=random_pixels(3, seed=1), **encode_graphs(example_graphs()))
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    model.save_pretrained(folder)
    torch.save(inputs, folder / "inputs.pt")
    return folder, model, inputs, logits


def test_saved_folder_is_safetensors_with_auto_map_and_code(saved):
    folder, *_ = saved
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    assert {"configuration_occlip.py", "modeling_occlip.py", "binding_occlip.py"} <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "occlip"
    assert config["auto_map"]["AutoModel"].endswith("modeling_occlip.OCCLIPModel")
    assert config["auto_map"]["AutoConfig"].endswith("configuration_occlip.OCCLIPConfig")


def test_round_trip_gives_identical_logits(saved):
    folder, _, inputs, logits = saved
    for loaded in (OCCLIPModel.from_pretrained(folder), AutoModel.from_pretrained(folder)):
        assert isinstance(loaded, OCCLIPModel)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(**inputs).logits_per_image, logits, atol=0, rtol=0)
    assert type(AutoConfig.from_pretrained(folder)).__name__ == "OCCLIPConfig"


@pytest.mark.slow
def test_remote_code_load_in_clean_venv(saved, clean_python, tmp_path):
    folder, _, _, logits = saved
    run_isolated(
        clean_python,
        f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(folder / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(**inputs).logits_per_image, "logits.pt")
        """,
        tmp_path,
    )
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits, atol=0, rtol=0)


def test_corrupt_checkpoint_is_a_clear_error(saved, tmp_path):
    folder, *_ = saved
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json",):
        (broken / name).write_text((folder / name).read_text())
    (broken / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(Exception) as info:
        OCCLIPModel.from_pretrained(broken)
    assert (
        "safetensors" in str(info.value).lower()
        or "header" in str(info.value).lower()
        or "model.safetensors" in str(info.value)
    )


@torch.no_grad()
def test_from_clip_towers_match_clip_exactly(tmp_path):
    clip = tiny_clip_model(seed=11)
    clip.save_pretrained(tmp_path / "clip")
    pixels = random_pixels(3, seed=2)
    graph = encode_graphs(example_graphs())
    for source in (clip, tmp_path / "clip"):
        model = OCCLIPModel.from_clip(source).eval()
        torch.testing.assert_close(model.logit_scale, clip.logit_scale)
        torch.testing.assert_close(
            model.get_image_features(pixels).pooler_output,
            clip.get_image_features(pixels).pooler_output,
            atol=0,
            rtol=0,
        )
        text = model.get_graph_features(**graph)
        valid = graph["node_mask"]
        expected = clip.get_text_features(
            input_ids=graph["node_input_ids"][valid], attention_mask=graph["node_attention_mask"][valid]
        ).pooler_output
        assert torch.allclose(text.node_embeds[valid], expected, atol=1e-6)
        assert torch.all(text.node_embeds[~valid] == 0)


def test_from_clip_rejects_mismatched_checkpoint():
    clip = tiny_clip_model()
    clip.visual_projection = torch.nn.Linear(32, 24, bias=True)  # an extra bias the OC-CLIP towers do not have
    with pytest.raises(ValueError, match="does not match"):
        OCCLIPModel.from_clip(clip)


@torch.no_grad()
def test_vision_tower_alone_loads_from_full_checkpoint(saved, tmp_path):
    folder, model, inputs, _ = saved
    pixels = inputs["pixel_values"]
    tower = OCCLIPVisionModel.from_pretrained(folder).eval()
    assert isinstance(tower.config, OCCLIPVisionConfig)
    expected = model.vision_model(pixels, output_hidden_states=True)
    got = tower(pixels, output_hidden_states=True)
    assert len(got.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    for a, b in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Saved alone, the tower keeps CLIP's `vision_model.` keys, so a plain CLIPVisionModel reads it too.
    tower.save_pretrained(tmp_path / "tower")
    assert isinstance(AutoModel.from_pretrained(tmp_path / "tower"), OCCLIPVisionModel)
    clip_tower = CLIPVisionModel.from_pretrained(tmp_path / "tower").eval()
    torch.testing.assert_close(clip_tower(pixels).pooler_output, expected.pooler_output, atol=0, rtol=0)
    assert isinstance(AutoModel.from_config(model.config.vision_config), OCCLIPVisionModel)


def test_clip_model_loads_occlip_towers(saved):
    """The towers keep CLIP's names, so a plain CLIPModel reads an OC-CLIP checkpoint's towers."""
    _, model, _, _ = saved
    clip = tiny_clip_model()
    incompatible = clip.load_state_dict(model.state_dict(), strict=False)
    assert incompatible.missing_keys == []
    assert all(key.startswith(("binding.", "similarity.")) for key in incompatible.unexpected_keys)
