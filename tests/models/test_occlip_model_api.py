"""OC-CLIP's transformers API, in the style of transformers' model testers: CLIP-shaped features, `return_dict` and
tuple equivalence, output flags, `main_input_name`, refused keyword arguments, `interpolate_pos_encoding`, the
sync-free graph path, and which weights the structured loss trains.

A tester builds the tiny config and inputs once; each test checks values against a reference (CLIP itself, the
dict form of the same call, or a second path through the model), not shapes only.
"""

import inspect
import re
from dataclasses import fields

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from modeling_occlip import (
    OCCLIPGraphFeatures,
    OCCLIPImageFeatures,
    OCCLIPModel,
    OCCLIPOutput,
    OCCLIPRerankOutput,
    OCCLIPTextModel,
    OCCLIPVisionModel,
)
from tests.factories import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    encode_graphs,
    example_graphs,
    random_pixels,
    tiny_clip_model,
    tiny_occlip_config,
)


class OCCLIPModelTester:
    """Tiny config and inputs for `OCCLIPModel` and its towers (as transformers' `CLIPModelTester`)."""

    def __init__(self, batch_size: int = 4, seq_length: int = 7, seed: int = 0):
        self.batch_size, self.seq_length, self.seed = batch_size, seq_length, seed
        self.num_layers, self.num_heads, self.num_patches = 2, 4, 16  # tiny_vision_config: 32 px, patch 8
        self.binding_layers, self.binding_heads = 2, 1

    def get_config(self, **overrides):
        return tiny_occlip_config(**overrides)

    def caption_inputs(self) -> dict:
        """Plain tokenized captions `bos words eos pad...` of varied lengths."""
        generator = torch.Generator().manual_seed(self.seed)
        ids = torch.full((self.batch_size, self.seq_length), PAD_ID)
        for row in range(self.batch_size):
            length = 1 + row % (self.seq_length - 2)
            words = torch.randint(1, 90, (length,), generator=generator)
            ids[row, : length + 2] = torch.cat([torch.tensor([BOS_ID]), words, torch.tensor([EOS_ID])])
        return {"input_ids": ids, "attention_mask": (ids != PAD_ID).long()}

    def prepare_config_and_inputs(self) -> tuple:
        inputs = dict(pixel_values=random_pixels(self.batch_size, seed=self.seed), **encode_graphs(example_graphs()))
        return self.get_config(), inputs

    def create_model(self, config=None) -> OCCLIPModel:
        """The model in eval mode, with eager attention: SDPA returns no attention weights."""
        torch.manual_seed(self.seed)
        model = OCCLIPModel(config or self.get_config()).eval()
        model.set_attn_implementation("eager")
        return model


@pytest.fixture(scope="module")
def tester():
    return OCCLIPModelTester()


@pytest.fixture(scope="module")
def model(tester):
    return tester.create_model()


@pytest.fixture(scope="module")
def inputs(tester):
    return tester.prepare_config_and_inputs()[1]


def graph_only(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


def assert_same(tuple_value, dict_value, path="output"):
    """Recursive exact equality of a tuple output against the dict output's values (bool masks compared as is)."""
    if isinstance(dict_value, (tuple, list)):
        assert isinstance(tuple_value, tuple) and len(tuple_value) == len(dict_value), path
        for index, (a, b) in enumerate(zip(tuple_value, dict_value)):
            assert_same(a, b, f"{path}[{index}]")
    else:
        assert isinstance(tuple_value, torch.Tensor) and tuple_value.dtype == dict_value.dtype, path
        assert torch.equal(tuple_value, dict_value), path


def flattened(output: ModelOutput) -> tuple:
    """What `CLIPOutput.to_tuple` gives: set fields in order, nested outputs as tuples."""
    return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in output.values())


# ---------------------------------------------------------------- CLIP-shaped features


@torch.no_grad()
def test_get_text_and_image_features_equal_the_clip_they_were_built_from(tester):
    clip = tiny_clip_model(seed=1)
    model = OCCLIPModel.from_clip(clip).eval()
    captions, pixels = tester.caption_inputs(), random_pixels(3, seed=2)

    text, expected_text = model.get_text_features(**captions), clip.get_text_features(**captions)
    assert type(text) is BaseModelOutputWithPooling
    torch.testing.assert_close(text.pooler_output, expected_text.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(text.last_hidden_state, expected_text.last_hidden_state, atol=0, rtol=0)

    image, expected_image = model.get_image_features(pixels), clip.get_image_features(pixels)
    assert isinstance(image, OCCLIPImageFeatures) and isinstance(image, BaseModelOutputWithPooling)
    torch.testing.assert_close(image.pooler_output, expected_image.pooler_output, atol=0, rtol=0)
    torch.testing.assert_close(image.last_hidden_state, expected_image.last_hidden_state, atol=0, rtol=0)
    # What binding needs is still there: keys/values of every binding layer over the 16 patches.
    assert image.binding_keys.shape[:4] == image.binding_values.shape[:4] == (3, 2, 1, 16)

    # forward's text_embeds / image_embeds are CLIP's normalised embeddings.
    out = model(pixel_values=pixels[:1].expand(4, -1, -1, -1), **encode_graphs(example_graphs()), **captions)
    expected = clip(pixel_values=pixels[:1].expand(4, -1, -1, -1), **captions)
    torch.testing.assert_close(out.text_embeds, expected.text_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.image_embeds, expected.image_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.text_model_output.pooler_output, expected.text_model_output.pooler_output)


def test_get_text_features_points_scene_graphs_to_get_graph_features(model, inputs):
    with pytest.raises(TypeError, match="get_graph_features"):
        model.get_text_features(**graph_only(inputs))
    with pytest.raises(ValueError, match="scene graphs go to get_graph_features"):
        model.get_text_features(inputs["node_input_ids"])


def test_forward_without_captions_has_no_text_embeds(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    assert out.text_embeds is None and out.text_model_output is None
    assert isinstance(out.graph_features, OCCLIPGraphFeatures)


# ---------------------------------------------------------------- return_dict and tuples


@torch.no_grad()
def test_return_dict_false_gives_the_flattened_dict_output(model, inputs, tester):
    kwargs = dict(**inputs, **tester.caption_inputs(), return_loss=True, output_attentions=True)
    kwargs["output_hidden_states"] = True
    as_dict = model(**kwargs)
    as_tuple = model(**kwargs, return_dict=False)
    assert isinstance(as_dict, OCCLIPOutput) and isinstance(as_tuple, tuple)
    assert_same(as_tuple, flattened(as_dict))
    assert_same(as_tuple, as_dict.to_tuple())
    # Nested outputs are tuples, not ModelOutputs, and every field set in the dict is in the tuple.
    assert not any(isinstance(value, ModelOutput) for value in as_tuple)
    assert len(as_tuple) == len(as_dict) == 11
    torch.testing.assert_close(as_tuple[0], as_dict.loss)


@torch.no_grad()
def test_config_return_dict_false_is_honoured_everywhere(tester, inputs):
    model = tester.create_model(tester.get_config(return_dict=False))
    captions = tester.caption_inputs()
    calls = {
        "forward": lambda **kw: model(**inputs, **kw),
        "get_image_features": lambda **kw: model.get_image_features(inputs["pixel_values"], **kw),
        "get_text_features": lambda **kw: model.get_text_features(**captions, **kw),
        "get_graph_features": lambda **kw: model.get_graph_features(**graph_only(inputs), **kw),
    }
    for name, call in calls.items():
        as_tuple, as_dict = call(), call(return_dict=True)
        assert isinstance(as_tuple, tuple), name
        assert isinstance(as_dict, ModelOutput), name
        assert_same(as_tuple, flattened(as_dict), name)


# ---------------------------------------------------------------- hidden states and attentions


@torch.no_grad()
def test_output_hidden_states_and_attentions(model, inputs, tester):
    captions = tester.caption_inputs()
    plain = model(**inputs, **captions)
    assert plain.image_features.hidden_states is None and plain.image_features.attentions is None
    assert plain.binding_attentions is None and plain.text_model_output.attentions is None

    out = model(**inputs, **captions, output_hidden_states=True, output_attentions=True)
    batch, tokens = tester.batch_size, tester.num_patches + 1
    image = out.image_features
    assert len(image.hidden_states) == tester.num_layers + 1
    assert len(image.attentions) == tester.num_layers
    assert image.attentions[0].shape == (batch, tester.num_heads, tokens, tokens)
    torch.testing.assert_close(image.attentions[0].sum(-1), torch.ones(batch, tester.num_heads, tokens))
    # The last hidden state is the last layer's output, the one CLIP's pooling reads.
    torch.testing.assert_close(image.hidden_states[-1], image.last_hidden_state)
    assert len(out.text_model_output.hidden_states) == tester.num_layers + 1
    assert len(out.text_model_output.attentions) == tester.num_layers
    # Asking for them changes no value.
    torch.testing.assert_close(out.logits_per_image, plain.logits_per_image, atol=0, rtol=0)

    num_queries = inputs["node_input_ids"].shape[1] + 2  # nodes, then 2 default queries
    assert len(out.binding_attentions) == tester.binding_layers
    for attention in out.binding_attentions:
        assert attention.shape == (batch, tester.binding_heads, batch, num_queries, tester.num_patches)
        # Nodes compete for each patch: a softmax over the valid queries, padded queries get nothing.
        query_mask = torch.cat([inputs["node_mask"], torch.ones(batch, 2, dtype=torch.bool)], 1)
        total = attention.sum(3)
        torch.testing.assert_close(total, torch.ones_like(total))
        assert torch.all(attention.permute(0, 2, 3, 1, 4)[:, ~query_mask] == 0)

    # `binding_attention` is the matched pairs' slice of the same maps.
    matched = model.binding_attention(out.image_features, out.graph_features)
    for per_pair, attention in zip(matched, out.binding_attentions):
        diagonal = torch.stack([attention[k, :, k] for k in range(batch)])
        torch.testing.assert_close(per_pair, diagonal, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_binding_attentions_do_not_depend_on_the_chunk_size(tester, inputs):
    big = tester.create_model()
    small = tester.create_model(tester.get_config(pair_chunk_size=3))
    small.load_state_dict(big.state_dict())
    expected = big(**inputs, output_attentions=True)
    got = small(**inputs, output_attentions=True)
    torch.testing.assert_close(got.logits_per_image, expected.logits_per_image, atol=1e-6, rtol=1e-6)
    for a, b in zip(got.binding_attentions, expected.binding_attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_config_output_flags_are_honoured(tester, inputs):
    model = tester.create_model(tester.get_config(output_attentions=True, output_hidden_states=True))
    out = model(**inputs)
    assert len(out.binding_attentions) == tester.binding_layers
    assert len(out.image_features.hidden_states) == tester.num_layers + 1
    assert model(**inputs, output_attentions=False).binding_attentions is None


# ---------------------------------------------------------------- signatures and keyword arguments


@pytest.mark.parametrize(
    ("model_class", "expected"),
    [(OCCLIPModel, "pixel_values"), (OCCLIPVisionModel, "pixel_values"), (OCCLIPTextModel, "input_ids")],
)
def test_main_input_name_is_the_first_forward_argument(model_class, expected):
    first = list(inspect.signature(model_class.forward).parameters)[1]
    assert model_class.main_input_name == first == expected


def test_unknown_keyword_arguments_are_errors(model, inputs, tester):
    pixels, captions = inputs["pixel_values"], tester.caption_inputs()
    calls = [
        lambda: model(**inputs, output_attention=True),
        lambda: model.get_image_features(pixels, foo=1),
        lambda: model.get_text_features(**captions, foo=1),
        lambda: model.get_graph_features(**graph_only(inputs), foo=1),
        lambda: OCCLIPVisionModel(model.config.vision_config)(pixel_values=pixels, foo=1),
        lambda: OCCLIPTextModel(model.config.text_config)(**captions, foo=1),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="unexpected keyword argument"):
            call()


@torch.no_grad()
def test_interpolate_pos_encoding_behaves_the_same_on_every_path(tester, inputs):
    clip = tiny_clip_model(seed=1)
    model = OCCLIPModel.from_clip(clip).eval()
    large = random_pixels(tester.batch_size, seed=4, size=48)  # a 6 x 6 patch grid instead of 4 x 4
    for call in (lambda: model.get_image_features(large), lambda: model(**{**inputs, "pixel_values": large})):
        with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
            call()
    image = model.get_image_features(large, interpolate_pos_encoding=True)
    expected = clip.get_image_features(large, interpolate_pos_encoding=True)
    torch.testing.assert_close(image.pooler_output, expected.pooler_output, atol=0, rtol=0)
    assert image.binding_keys.shape[3] == 36
    out = model(**{**inputs, "pixel_values": large}, interpolate_pos_encoding=True)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(expected.pooler_output, dim=-1))
    graphs = model.get_graph_features(**graph_only(inputs))
    torch.testing.assert_close(out.logits_per_image, model.score(image, graphs), atol=1e-6, rtol=1e-6)
    tower = OCCLIPVisionModel(model.config.vision_config).eval()
    tower.load_state_dict(model.vision_model.state_dict())
    torch.testing.assert_close(
        tower(large, interpolate_pos_encoding=True).last_hidden_state, image.last_hidden_state, atol=0, rtol=0
    )


# ---------------------------------------------------------------- graph path


def test_graph_path_skips_validation_without_host_syncs(tester, inputs, monkeypatch):
    model = tester.create_model()  # its text tower is swapped below
    with torch.no_grad():
        checked = model.get_graph_features(**graph_only(inputs))
    text_tower = model.text_model

    def refuse(*args, **kwargs):
        raise AssertionError("host sync on the graph path")

    guarded = ("item", "tolist", "__bool__", "nonzero", "any", "all", "__int__")
    originals = {name: getattr(torch.Tensor, name) for name in guarded}

    class UnguardedTower(torch.nn.Module):
        """The real text tower with the guard lifted: transformers' own mask code may sync, ours may not."""

        def forward(self, **kwargs):
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
            try:
                return text_tower(**kwargs)
            finally:
                for name in guarded:
                    setattr(torch.Tensor, name, refuse)

    model.text_model = UnguardedTower()
    # `torch.unique` (one text-tower row per distinct phrase) is the one sync the path keeps, inside torch.
    for name in guarded:
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        fast = model.get_graph_features(**graph_only(inputs), validate_inputs=False)
    monkeypatch.undo()
    model.text_model = text_tower
    assert_same(fast.to_tuple(), checked.to_tuple())
    # And validation stays on by default.
    bad = graph_only(inputs)
    bad["relation_object_index"] = bad["relation_object_index"].clone()
    bad["relation_object_index"][0, 0] = 7
    with pytest.raises(ValueError, match="relation_object_index = 7"):
        model.get_graph_features(**bad)


@torch.no_grad()
def test_graph_features_equal_per_phrase_text_tower_outputs(model, inputs):
    """Known answer: each valid node/predicate embedding is the projected text-tower output of that phrase alone;
    padding is zero, predicate ids say which predicates share text."""
    graphs = model.get_graph_features(**graph_only(inputs))
    for name, valid_name in (("node", "node_mask"), ("relation", "relation_mask")):
        valid = inputs[valid_name]
        ids, attention = inputs[f"{name}_input_ids"][valid], inputs[f"{name}_attention_mask"][valid]
        expected = torch.stack(
            [model.get_text_features(i[None, : int(a.sum())]).pooler_output[0] for i, a in zip(ids, attention)]
        )
        embeds = getattr(graphs, f"{name}_embeds")
        torch.testing.assert_close(embeds[valid], expected, atol=1e-6, rtol=1e-6)
        assert torch.all(embeds[~valid] == 0)
    ids = graphs.relation_predicate_id
    # example_graphs: "left of" in graphs 0 and 1, "above" in graphs 1 and 3.
    assert ids[0, 0] == ids[1, 1] and ids[1, 0] == ids[3, 0] and ids[0, 0] != ids[1, 0]
    assert torch.all(ids[~inputs["relation_mask"]] == -1)


@torch.no_grad()
def test_graphs_without_relations(model, inputs):
    """No relation tensors, or relation tensors with zero slots: the same node features and empty relations."""
    with_relations = model.get_graph_features(**graph_only(inputs))
    node_inputs = {k: v for k, v in graph_only(inputs).items() if k.startswith("node_")}
    without = model.get_graph_features(**node_inputs)
    no_slots = {k: v[:, :0] for k, v in graph_only(inputs).items() if k.startswith("relation_")}
    empty = model.get_graph_features(**node_inputs, **no_slots, validate_inputs=False)
    for graphs in (without, empty):
        torch.testing.assert_close(graphs.node_embeds, with_relations.node_embeds, atol=1e-6, rtol=1e-6)
        assert graphs.relation_embeds.shape == (4, 0, with_relations.relation_embeds.shape[-1])
        assert graphs.relation_mask.dtype == torch.bool and graphs.relation_predicate_id.shape == (4, 0)
    assert_same(without.to_tuple(), empty.to_tuple())


def test_bool_masks_are_kept_in_the_tuple_form(model, inputs):
    """Deliberate break of transformers' output-equivalence check (it subtracts outputs; README "Limitations"):
    masks stay bool in both forms, because scoring and the relation loss use them as masks."""
    with torch.no_grad():
        as_tuple = model.get_graph_features(**graph_only(inputs), return_dict=False)
    names = [f.name for f in fields(OCCLIPGraphFeatures)]
    assert as_tuple[names.index("node_mask")].dtype == torch.bool
    assert as_tuple[names.index("relation_mask")].dtype == torch.bool


# ---------------------------------------------------------------- documentation and training


@pytest.mark.parametrize("output_class", [OCCLIPImageFeatures, OCCLIPGraphFeatures, OCCLIPOutput, OCCLIPRerankOutput])
def test_output_fields_are_documented_one_by_one(output_class):
    doc = inspect.getdoc(output_class)
    for field in fields(output_class):
        assert re.search(rf"^{field.name} \(`", doc, re.MULTILINE), f"{output_class.__name__}.{field.name}"


def test_structured_loss_does_not_train_the_global_embeddings(tester, inputs):
    """Documented (OCCLIPModel docstring, README): `visual_projection` and the vision `post_layernorm` serve
    `get_image_features` and reranking; the structured loss never reads them."""
    model = tester.create_model().train()
    model(**inputs, return_loss=True).loss.backward()
    post_layernorm = model.vision_model.post_layernorm
    for parameter in (model.visual_projection.weight, post_layernorm.weight, post_layernorm.bias):
        assert parameter.grad is None
    for parameter in (model.binding.layers[0].k_proj.weight, model.vision_model.pre_layrnorm.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


# ---------------------------------------------------------------- towers


@pytest.mark.parametrize("tower", ["vision", "text"])
@torch.no_grad()
def test_towers_return_dict_hidden_states_and_config_flags(tower, tester):
    config = tester.get_config()
    sub_config = config.vision_config if tower == "vision" else config.text_config
    model_class = OCCLIPVisionModel if tower == "vision" else OCCLIPTextModel
    inputs = {"pixel_values": random_pixels(2)} if tower == "vision" else tester.caption_inputs()
    sub_config._attn_implementation = "eager"  # SDPA returns no attention weights
    torch.manual_seed(0)
    model = model_class(sub_config).eval()
    as_dict = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(as_dict.hidden_states) == tester.num_layers + 1 and len(as_dict.attentions) == tester.num_layers
    assert_same(
        model(**inputs, output_hidden_states=True, output_attentions=True, return_dict=False), flattened(as_dict)
    )
    # The tower inside the full model is the same computation.
    full = OCCLIPModel(config).eval()
    full_tower = full.vision_model if tower == "vision" else full.text_model
    full_tower.load_state_dict(model.state_dict())
    torch.testing.assert_close(full_tower(**inputs).pooler_output, as_dict.pooler_output, atol=0, rtol=0)
    sub_config.return_dict = False
    tuple_model = model_class(sub_config).eval()
    tuple_model.load_state_dict(model.state_dict())
    assert_same(tuple_model(**inputs), (as_dict.last_hidden_state, as_dict.pooler_output))


def test_readme_occlip_example_runs(tmp_path):
    """The README's first OC-CLIP block, with its placeholders filled by a tiny saved CLIP and tiny inputs."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## OC-CLIP") :]
    start = section.index("```python\n") + len("```python\n")
    block = section[start : section.index("```\n", start)]
    tiny_clip_model(seed=1).save_pretrained(tmp_path / "clip")
    graphs = encode_graphs(example_graphs())
    block = block.replace('"path/to/saved/CLIPModel"', repr(str(tmp_path / "clip")))
    block = block.replace("pixel_values=...", "pixel_values=pixel_values")
    block = block.replace("get_graph_features(node_input_ids, ...)", "get_graph_features(**graphs)")
    for name in graphs:
        block = block.replace(f"{name}=...", f"{name}=graphs[{name!r}]")
    captions = OCCLIPModelTester().caption_inputs()
    namespace = dict(graphs=graphs, pixel_values=random_pixels(4), **captions)
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["top"].indices.shape == (4, 4)
    out = namespace["out"]
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_rel)  # rel_loss_weight 1 by default
    torch.testing.assert_close(namespace["logits"], out.logits_per_image, atol=1e-6, rtol=1e-6)
