"""Weight initialisation of both full models and both towers, as transformers' model testers check it
(`test_initialization`, `test_can_init_all_missing_weights`): the CLIP parts of a fresh model are distributed as
in a `CLIPModel` / `CLIPVisionModel` of the same sub-configs, the new modules follow their own documented rule, and
`_init_weights` writes every parameter and buffer (a model whose weights were wiped is fully re-initialised)."""

import math

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

from modeling_cloc import CLOCConfig, CLOCModel, CLOCVisionConfig, CLOCVisionModel
from modeling_occlip import OCCLIPConfig, OCCLIPModel, OCCLIPVisionConfig, OCCLIPVisionModel
from modeling_occlip.configuration_occlip import OCCLIPTextConfig
from modeling_occlip.modeling_occlip import OCCLIPTextModel
from tests.factories import tiny_binding_config, tiny_text_config, tiny_vision_config

# Wider than the other tests' towers so that per-tensor statistics are estimated within a few percent.
TEXT = tiny_text_config(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
VISION = tiny_vision_config(hidden_size=64, intermediate_size=128, num_hidden_layers=3)
PROMPTER = {"initializer_range": 0.05}


def _clip_model():
    return CLIPModel(CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24))


def _clip_vision():
    return CLIPVisionModel(CLIPVisionConfig(**VISION))


BUILDERS = {
    "CLOCModel": (
        lambda: CLOCModel(
            CLOCConfig(text_config=TEXT, vision_config=VISION, prompter_config=PROMPTER, projection_dim=24)
        ),
        _clip_model,
    ),
    "OCCLIPModel": (
        lambda: OCCLIPModel(
            OCCLIPConfig(
                text_config=TEXT, vision_config=VISION, binding_config=tiny_binding_config(), projection_dim=24
            )
        ),
        _clip_model,
    ),
    "CLOCVisionModel": (lambda: CLOCVisionModel(CLOCVisionConfig(**VISION)), _clip_vision),
    "CLOCVisionModel+Prompter": (
        lambda: CLOCVisionModel(CLOCVisionConfig(**VISION, prompter_config=PROMPTER)),
        _clip_vision,
    ),
    "OCCLIPVisionModel": (lambda: OCCLIPVisionModel(OCCLIPVisionConfig(**VISION)), _clip_vision),
    "OCCLIPTextModel": (
        lambda: OCCLIPTextModel(OCCLIPTextConfig(**TEXT)),
        lambda: CLIPTextModel(CLIPTextConfig(**TEXT)),
    ),
}


def assert_distributed_like(ours: torch.nn.Module, reference: torch.nn.Module) -> int:
    """Every parameter `reference` has (by name) has the same mean and std in `ours`, within the sampling error of
    a tensor that size (constants, e.g. LayerNorm ones and zero biases, exactly); returns how many were compared."""
    theirs = dict(reference.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        if name not in theirs:
            continue
        a, b = param.detach().double().flatten(), theirs[name].detach().double().flatten()
        assert a.shape == b.shape, name
        compared += 1
        if a.numel() == 1 or b.std() == 0:
            torch.testing.assert_close(a, b, msg=f"{name}: constant init differs from CLIP's")
            continue
        n = a.numel()
        # Relative sampling error of a std estimate is about 1 / sqrt(2n): allow 6 of them (and 6 of the mean's).
        assert abs(a.std() / b.std() - 1) < 6 / math.sqrt(2 * n), f"{name}: std {a.std():.4f} vs CLIP's {b.std():.4f}"
        assert abs(a.mean() - b.mean()) < 6 * b.std() / math.sqrt(n), f"{name}: mean {a.mean():.4f} vs {b.mean():.4f}"
    return compared


@pytest.mark.parametrize("name", list(BUILDERS))
def test_fresh_model_initialises_its_clip_parts_as_clip(name):
    build, build_reference = BUILDERS[name]
    torch.manual_seed(0)
    ours = build()
    torch.manual_seed(1)
    reference = build_reference()
    assert assert_distributed_like(ours, reference) == len(list(reference.parameters()))
    # The check that failed before: out-of-tree models left CLIP's attention at N(0, 0.02).
    layer = dict(ours.named_modules())
    attention = next(module for key, module in layer.items() if key.endswith("encoder.layers.0.self_attn"))
    assert TEXT["hidden_size"] == VISION["hidden_size"] and TEXT["num_hidden_layers"] == VISION["num_hidden_layers"]
    width, depth = VISION["hidden_size"], VISION["num_hidden_layers"]
    expected = width**-0.5 * (2 * depth) ** -0.5
    assert abs(float(attention.q_proj.weight.detach().std()) / expected - 1) < 0.1


def _wipe(model: torch.nn.Module) -> None:
    """Forget that anything was initialised and fill every parameter and buffer with garbage (NaN, or -1)."""
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.__dict__.pop("_is_hf_initialized", None)
            tensor.fill_(float("nan") if tensor.is_floating_point() else -1)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_init_weights_covers_every_parameter_and_buffer(name):
    """As `test_can_init_all_missing_weights`: weights built on the meta device, or wiped, are all written back by
    `initialize_weights`, with the same distribution as a fresh model."""
    build, build_reference = BUILDERS[name]
    torch.manual_seed(1)
    reference = build_reference()
    with torch.device("meta"):
        on_meta = build()
    on_meta.to_empty(device="cpu")
    wiped = build()
    fresh = build()
    for model in (on_meta, wiped):
        _wipe(model)
        model.initialize_weights()
        state = model.state_dict()
        bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
        assert not bad, f"_init_weights leaves these uninitialised: {bad[:5]}"
        assert assert_distributed_like(model, reference) == len(list(reference.parameters()))
        assert assert_distributed_like(model, fresh) == len(list(fresh.parameters()))
        for key, value in fresh.state_dict().items():
            if not value.is_floating_point():  # position ids and the like: exact
                torch.testing.assert_close(state[key], value, msg=key)


def test_initialisation_leaves_loaded_weights_alone(tmp_path):
    """Visiting every module must not re-initialise what `from_pretrained` loaded (the flag transformers sets)."""
    torch.manual_seed(0)
    model = CLOCModel(CLOCConfig(text_config=TEXT, vision_config=VISION, prompter_config=PROMPTER, projection_dim=24))
    model.save_pretrained(tmp_path)
    torch.manual_seed(5)
    loaded = CLOCModel.from_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("in_tower", [False, True])
def test_new_modules_follow_their_own_rule(in_tower):
    """Prompter and box head: linear weights N(0, prompter_config.initializer_range), zero biases, unit norms; the box
    head's last layer zero; the position map at unit scale; the box attention scale at its configured value. The
    tower's Prompter (built before `post_init`) follows the same rule as the full model's."""
    torch.manual_seed(0)
    if in_tower:
        model = CLOCVisionModel(CLOCVisionConfig(**VISION, prompter_config=PROMPTER))
    else:
        model = CLOCModel(
            CLOCConfig(text_config=TEXT, vision_config=VISION, prompter_config=PROMPTER, projection_dim=24)
        )
        assert torch.all(model.box_head.fc2.weight == 0)
        assert abs(float(model.box_head.fc1.weight.detach().std()) / 0.05 - 1) < 0.1
        torch.testing.assert_close(model.region_logit_scale, torch.tensor(model.config.region_logit_scale_init_value))
    prompter = model.prompter
    for key, module in prompter.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not prompter.position_proj:
            assert abs(float(module.weight.detach().std()) / 0.05 - 1) < 6 / math.sqrt(2 * module.weight.numel()), key
            assert module.bias is None or torch.all(module.bias == 0), key
        elif isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), key
    position = prompter.position_proj.weight.detach()
    assert abs(float(position.std()) * position.shape[1] ** 0.5 - 1) < 0.2
    assert float(prompter.box_attention_scale.detach()) == 10.0
