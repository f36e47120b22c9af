"""transformers' common model checks, written for CLOCModel and the two vision towers in the style of its model
testers (`ModelTesterMixin`): tuple/dict equivalence under `return_dict`, `main_input_name`, `get_*_features` under
`config.return_dict`, hidden states and attentions (against a `CLIPModel` / `CLIPVisionModel` holding the same
weights), `interpolate_pos_encoding` on every path, unknown keyword arguments, documented outputs, and save/load of
the sub-configs of both full models."""

import dataclasses
import inspect

import pytest
import torch
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from modeling_cloc import (
    CLOCConfig,
    CLOCGroundingOutput,
    CLOCModel,
    CLOCOutput,
    CLOCPrompterConfig,
    CLOCRegionOutput,
    CLOCTextConfig,
    CLOCVisionConfig,
    CLOCVisionModel,
    CLOCVisionOutput,
)
from modeling_occlip import (
    OCCLIPConfig,
    OCCLIPTextConfig,
    OCCLIPVisionConfig,
    OCCLIPVisionModel,
)
from modeling_occlip.configuration_occlip import OCCLIPBindingConfig
from tests.factories import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    random_pixels,
    tiny_binding_config,
    tiny_text_config,
    tiny_vision_config,
)


class CLOCModelTester:
    """Tiny config and inputs: 2 images with 2 boxes each (one masked), a caption per image and per box."""

    batch_size, regions, seq_length = 2, 2, 6

    def get_config(self) -> CLOCConfig:
        return CLOCConfig(
            text_config=tiny_text_config(),
            vision_config=tiny_vision_config(),
            prompter_config={"initializer_range": 0.2},
            projection_dim=24,
        )

    def captions(self, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.full((rows, self.seq_length), PAD_ID)
        for row in range(rows):
            length = 2 + row % 3
            ids[row, 0], ids[row, 1 : 1 + length] = BOS_ID, torch.randint(1, 90, (length,), generator=generator)
            ids[row, 1 + length] = EOS_ID
        return ids, (ids != PAD_ID).long()

    def prepare_inputs(self, size: int = 32) -> dict:
        input_ids, attention_mask = self.captions(self.batch_size, seed=0)
        region_ids, region_mask = self.captions(self.batch_size * self.regions, seed=1)
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=random_pixels(self.batch_size, seed=2, size=size),
            input_boxes=torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]], [[0.0, 0.5, 0.5, 1.0]] * 2]),
            box_mask=torch.tensor([[True, True], [True, False]]),
            region_input_ids=region_ids.view(self.batch_size, self.regions, -1),
            region_attention_mask=region_mask.view(self.batch_size, self.regions, -1),
        )

    def model(self, attn_implementation: str = "sdpa") -> CLOCModel:
        torch.manual_seed(0)
        model = CLOCModel(self.get_config()).eval()
        model.set_attn_implementation(attn_implementation)
        return model

    def clip_with_the_same_weights(self, model: CLOCModel) -> CLIPModel:
        clip = CLIPModel(
            CLIPConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
        )
        clip.set_attn_implementation(model.config._attn_implementation)
        result = clip.load_state_dict(model.state_dict(), strict=False)
        assert not result.missing_keys
        return clip.eval()


TESTER = CLOCModelTester()


def as_nested_tuple(output):
    """What `to_tuple` must give: the set fields in order, nested outputs flattened the same way (CLIPOutput)."""
    return tuple(as_nested_tuple(v) if isinstance(v, ModelOutput) else v for v in output.values())


def assert_same(actual, expected, path="output"):
    """Recursive equality of tuples of tensors (float tensors to 1e-6), naming the first place they differ."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, tuple) and len(actual) == len(expected), f"{path}: {type(actual)} vs {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, path
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6, msg=path)
    else:
        assert actual == expected, path


# ---------------------------------------------------------------------------------------------------- CLOCModel


@pytest.mark.parametrize("through", ["argument", "config"])
def test_return_dict_false_gives_the_flattened_output(through):
    model, inputs = TESTER.model(), TESTER.prepare_inputs()
    with torch.no_grad():
        expected = model(**inputs, return_loss=True, output_hidden_states=True)
        if through == "config":
            model.config.return_dict = False
            as_tuple = model(**inputs, return_loss=True, output_hidden_states=True)
        else:
            as_tuple = model(**inputs, return_loss=True, output_hidden_states=True, return_dict=False)
    assert isinstance(expected, CLOCOutput) and isinstance(as_tuple, tuple)
    assert_same(as_tuple, as_nested_tuple(expected))
    # CLIP's order: the loss first, the towers' outputs last, as tuples.
    assert as_tuple[0] is not None and torch.equal(as_tuple[0], expected.loss)
    assert_same(as_tuple[-1], expected.vision_model_output.to_tuple())
    assert len(as_tuple[-2][2]) == model.config.text_config.num_hidden_layers + 1  # text hidden states


def test_features_follow_config_return_dict_and_equal_clip():
    model, inputs = TESTER.model(), TESTER.prepare_inputs()
    clip = TESTER.clip_with_the_same_weights(model)
    with torch.no_grad():
        image = model.get_image_features(inputs["pixel_values"])
        text = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        assert isinstance(image, BaseModelOutputWithPooling) and isinstance(text, BaseModelOutputWithPooling)
        clip_image = clip.get_image_features(inputs["pixel_values"])
        clip_text = clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        torch.testing.assert_close(image.pooler_output, clip_image.pooler_output)
        torch.testing.assert_close(image.last_hidden_state, clip_image.last_hidden_state)
        torch.testing.assert_close(text.pooler_output, clip_text.pooler_output)
        model.config.return_dict = False
        image_tuple = model.get_image_features(inputs["pixel_values"])
        text_tuple = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        assert isinstance(image_tuple, tuple) and isinstance(text_tuple, tuple)
        assert_same(image_tuple, image.to_tuple())
        assert_same(text_tuple, text.to_tuple())
        # Internal calls are unaffected: the region path still works with config.return_dict=False.
        regions = model.get_region_features(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"])
        assert isinstance(regions, CLOCRegionOutput)
        out = model(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
        clip_out = clip(**{k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")})
    torch.testing.assert_close(out[0], clip_out.logits_per_image)  # no loss: logits_per_image comes first


def test_hidden_states_and_attentions_are_the_towers_own():
    """`output_hidden_states` / `output_attentions` reach both towers and equal CLIP's with the same weights;
    without them the outputs hold none."""
    model, inputs = TESTER.model("eager"), TESTER.prepare_inputs()
    clip = TESTER.clip_with_the_same_weights(model)
    keys = ("input_ids", "attention_mask", "pixel_values")
    with torch.no_grad():
        plain = model(**{k: inputs[k] for k in keys})
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        reference = clip(**{k: inputs[k] for k in keys}, output_hidden_states=True, output_attentions=True)
    assert plain.vision_model_output.hidden_states is None and plain.text_model_output.attentions is None
    for ours, theirs, config in (
        (out.vision_model_output, reference.vision_model_output, model.config.vision_config),
        (out.text_model_output, reference.text_model_output, model.config.text_config),
    ):
        assert len(ours.hidden_states) == config.num_hidden_layers + 1
        assert len(ours.attentions) == config.num_hidden_layers
        assert ours.attentions[0].shape[1] == config.num_attention_heads
        assert_same(ours.hidden_states, tuple(theirs.hidden_states))
        assert_same(ours.attentions, tuple(theirs.attentions))
        torch.testing.assert_close(ours.attentions[0].sum(-1), torch.ones_like(ours.attentions[0][..., 0]))


@pytest.mark.parametrize(
    "model_class, expected",
    [(CLOCModel, "input_ids"), (CLOCVisionModel, "pixel_values"), (OCCLIPVisionModel, "pixel_values")],
)
def test_main_input_name_is_the_first_forward_argument(model_class, expected):
    first = list(inspect.signature(model_class.forward).parameters)[1]
    assert model_class.main_input_name == first == expected
    if model_class is CLOCModel:
        assert CLOCModel.main_input_name == CLIPModel.main_input_name


def test_unknown_keyword_arguments_are_an_error():
    """A misspelt or old argument name (`boxes=`) is refused by name, not silently dropped."""
    model, inputs = TESTER.model(), TESTER.prepare_inputs()
    pixels, boxes = inputs["pixel_values"], inputs["input_boxes"]
    with pytest.raises(TypeError, match="CLOCModel.forward.*boxes"):
        model(**{k: inputs[k] for k in ("input_ids", "pixel_values")}, boxes=boxes)
    with pytest.raises(TypeError, match="get_image_features.*pixel_value\\b"):
        model.get_image_features(pixels, pixel_value=pixels)
    with pytest.raises(TypeError, match="get_text_features.*attention"):
        model.get_text_features(inputs["input_ids"], attention=inputs["attention_mask"])
    tower = CLOCVisionModel(CLOCVisionConfig(**tiny_vision_config(), prompter_config={}))
    with pytest.raises(TypeError, match="CLOCVisionModel.forward.*boxes"):
        tower(pixels, boxes=boxes)
    with pytest.raises(TypeError, match="OCCLIPVisionModel.forward.*image"):
        OCCLIPVisionModel(OCCLIPVisionConfig(**tiny_vision_config()))(pixels, image=pixels)


def test_interpolate_pos_encoding_is_the_same_on_every_path(tmp_path):
    """48 px images on a 32 px model: refused by name without the flag; with it, forward, the feature methods,
    cached tokens, grounding and the standalone tower agree (and the image embedding is CLIP's)."""
    model, inputs = TESTER.model(), TESTER.prepare_inputs(size=48)
    pixels, boxes, mask = inputs["pixel_values"], inputs["input_boxes"], inputs["box_mask"]
    model.save_pretrained(tmp_path)
    tower = CLOCVisionModel.from_pretrained(tmp_path).eval()
    for call in (
        lambda: model(**inputs),
        lambda: model.get_image_features(pixels),
        lambda: model.get_region_features(pixel_values=pixels, input_boxes=boxes),
        lambda: model.ground(pixel_values=pixels, input_ids=inputs["region_input_ids"]),
        lambda: tower(pixels, input_boxes=boxes),
    ):
        with pytest.raises(ValueError, match="image_size=32"):
            call()
    with torch.no_grad():
        out = model(**inputs, interpolate_pos_encoding=True)
        image = model.get_image_features(pixels, interpolate_pos_encoding=True).pooler_output
        clip_image = TESTER.clip_with_the_same_weights(model).get_image_features(pixels, interpolate_pos_encoding=True)
        regions = model.get_region_features(
            pixel_values=pixels, input_boxes=boxes, box_mask=mask, interpolate_pos_encoding=True
        )
        tokens = model.get_image_tokens(pixels, interpolate_pos_encoding=True)
        cached = model.get_region_features(image_tokens=tokens, input_boxes=boxes, box_mask=mask)
        grounded = model.ground(
            pixel_values=pixels,
            input_ids=inputs["region_input_ids"],
            attention_mask=inputs["region_attention_mask"],
            interpolate_pos_encoding=True,
        )
        from_tower = tower(pixels, input_boxes=boxes, box_mask=mask, interpolate_pos_encoding=True)
    assert tokens.shape[1] == 1 + (48 // 8) ** 2
    torch.testing.assert_close(image, clip_image.pooler_output)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(image, dim=-1))
    torch.testing.assert_close(regions.region_embeds, out.region_embeds)
    torch.testing.assert_close(cached.region_embeds, out.region_embeds)
    torch.testing.assert_close(from_tower.region_embeds, out.region_embeds, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grounded.predicted_boxes, out.predicted_boxes)


def test_region_and_grounding_outputs_are_model_outputs_equal_to_forwards():
    model, inputs = TESTER.model(), TESTER.prepare_inputs()
    pixels, boxes, mask = inputs["pixel_values"], inputs["input_boxes"], inputs["box_mask"]
    with torch.no_grad():
        out = model(**inputs)
        regions = model.get_region_features(pixel_values=pixels, input_boxes=boxes, box_mask=mask)
        grounded = model.ground(
            pixel_values=pixels, input_ids=inputs["region_input_ids"], attention_mask=inputs["region_attention_mask"]
        )
        tokens = model.get_image_tokens(pixels)
        hidden, _ = model.prompter(model.prompter.box_prompts(boxes), tokens, boxes)
    assert isinstance(regions, CLOCRegionOutput) and isinstance(grounded, CLOCGroundingOutput)
    torch.testing.assert_close(regions.region_embeds, out.region_embeds)
    torch.testing.assert_close(regions.region_hidden_states, hidden * mask[..., None])
    assert torch.equal(regions.box_mask, mask)
    torch.testing.assert_close(grounded.predicted_boxes, out.predicted_boxes)
    valid = out.box_mask
    torch.testing.assert_close(grounded.region_text_embeds[valid], out.region_text_embeds[valid])
    torch.testing.assert_close(grounded.predicted_boxes, model.box_head(grounded.region_hidden_states))
    assert_same(regions.to_tuple(), (regions.region_embeds, regions.region_hidden_states, regions.box_mask))


@pytest.mark.parametrize("output_class", [CLOCOutput, CLOCRegionOutput, CLOCGroundingOutput, CLOCVisionOutput])
def test_output_fields_are_documented_one_by_one(output_class):
    """As in modeling_clip.py: each field opens its own entry `name (type ...):` in the class docstring."""
    documented = inspect.getdoc(output_class)
    for field in dataclasses.fields(output_class):
        assert f"\n{field.name} (`" in documented, f"{output_class.__name__}.{field.name} is not documented"


# ---------------------------------------------------------------------------------------------------- the towers

TOWERS = {
    "CLOCVisionModel": lambda: CLOCVisionModel(CLOCVisionConfig(**tiny_vision_config())),
    "CLOCVisionModel+Prompter": lambda: CLOCVisionModel(
        CLOCVisionConfig(**tiny_vision_config(), prompter_config={"initializer_range": 0.2})
    ),
    "OCCLIPVisionModel": lambda: OCCLIPVisionModel(OCCLIPVisionConfig(**tiny_vision_config())),
}


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_is_clip_vision_with_return_dict_and_outputs_honoured(name):
    torch.manual_seed(0)
    tower = TOWERS[name]().eval()
    tower.set_attn_implementation("eager")
    clip = CLIPVisionModel(CLIPVisionConfig(**tiny_vision_config()))
    clip.set_attn_implementation("eager")
    assert not clip.load_state_dict(tower.clip_state_dict()).missing_keys
    clip.eval()
    pixels = random_pixels(2, seed=3)
    with torch.no_grad():
        out = tower(pixels, output_hidden_states=True, output_attentions=True)
        reference = clip(pixels, output_hidden_states=True, output_attentions=True)
        as_tuple = tower(pixels, output_hidden_states=True, output_attentions=True, return_dict=False)
        tower.config.return_dict = False
        from_config = tower(pixels, output_hidden_states=True, output_attentions=True)
    assert_same(as_tuple, as_nested_tuple(out))
    assert_same(from_config, as_nested_tuple(out))
    assert_same(as_nested_tuple(out)[:4], as_nested_tuple(reference))
    assert len(out.hidden_states) == 3 and len(out.attentions) == 2


@pytest.mark.parametrize("name", list(TOWERS))
def test_tower_refuses_bad_pixels_by_name(name):
    """Both towers check pixel_values as the full models do (raw integers, a wrong size), before any work."""
    tower = TOWERS[name]()
    with pytest.raises(ValueError, match="normalised float pixels"):
        tower(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected \\[batch, 3, 32, 32\\]"):
        tower(random_pixels(1, size=40))


# ---------------------------------------------------------------------------------------------------- sub-configs

FULL_CONFIGS = {
    "cloc": (
        TESTER.get_config,
        {"text_config": CLOCTextConfig, "vision_config": CLOCVisionConfig, "prompter_config": CLOCPrompterConfig},
    ),
    "occlip": (
        lambda: OCCLIPConfig(
            text_config=tiny_text_config(),
            vision_config=tiny_vision_config(),
            binding_config=tiny_binding_config(),
            projection_dim=24,
        ),
        {"text_config": OCCLIPTextConfig, "vision_config": OCCLIPVisionConfig, "binding_config": OCCLIPBindingConfig},
    ),
}


@pytest.mark.parametrize("family", list(FULL_CONFIGS))
def test_sub_configs_save_and_load(family, tmp_path):
    """As transformers' `test_load_vision_text_config`: a sub-config loaded from a full folder equals the one inside
    the full config (a CLOC vision config gains no Prompter), and each sub-config round-trips on its own."""
    build, sub_classes = FULL_CONFIGS[family]
    config = build()
    config.save_pretrained(tmp_path / "full")
    reloaded = type(config).from_pretrained(tmp_path / "full")
    assert reloaded.to_dict() == config.to_dict()
    for key, sub_class in sub_classes.items():
        inside = getattr(config, key)
        assert sub_class.from_pretrained(tmp_path / "full").to_dict() == inside.to_dict(), key
        inside.save_pretrained(tmp_path / key)
        assert sub_class.from_pretrained(tmp_path / key).to_dict() == inside.to_dict(), key


def test_invariants_broken_on_purpose_are_as_the_readme_says():
    """The README names two deliberate departures from transformers' conventions: non-float fields in the outputs
    (the loss needs the masks and caption keys), and hidden states always returned when the Prompter reads an
    earlier layer."""
    model, inputs = TESTER.model(), TESTER.prepare_inputs()
    with torch.no_grad():
        out = model(**inputs)
    assert out.box_mask.dtype == out.grounding_mask.dtype == torch.bool
    assert out.region_caption_keys.dtype == torch.int64
    assert out.vision_model_output.hidden_states is None  # the default layer (-1) needs none
    config = TESTER.get_config()
    config.prompter_config.vision_feature_layer = 1
    earlier = CLOCModel(config).eval()
    with torch.no_grad():
        features = earlier.get_image_features(inputs["pixel_values"], output_hidden_states=False)
    assert len(features.hidden_states) == config.vision_config.num_hidden_layers + 1
