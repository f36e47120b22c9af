"""OC-CLIP bad input: every case is a ValueError whose message names the problem."""

import pytest
import torch

from modeling_occlip import OCCLIPConfig
from tests.factories import encode_graphs, example_graphs, random_pixels, tiny_occlip_model


@pytest.fixture(scope="module")
def model():
    return tiny_occlip_model()


def graph_inputs():
    return encode_graphs(example_graphs())


def call(model, pixels=None, **graph):
    with torch.no_grad():
        return model(pixel_values=random_pixels(4) if pixels is None else pixels, **graph)


def test_relation_index_outside_node_range(model):
    graph = graph_inputs()
    graph["relation_object_index"][0, 0] = 7
    with pytest.raises(ValueError, match=r"caption 0, relation 0: relation_object_index = 7"):
        call(model, **graph)


def test_relation_pointing_at_padded_node(model):
    graph = graph_inputs()
    graph["relation_subject_index"][3, 0] = 2  # caption 3 has two valid nodes of three slots
    with pytest.raises(
        ValueError, match=r"caption 3, relation 0: relation_subject_index = 2 does not point to a valid"
    ):
        call(model, **graph)


def test_negative_relation_index(model):
    graph = graph_inputs()
    graph["relation_subject_index"][1, 1] = -1
    with pytest.raises(ValueError, match=r"caption 1, relation 1"):
        call(model, **graph)


def test_self_loop(model):
    graph = graph_inputs()
    graph["relation_object_index"][0, 0] = 0
    with pytest.raises(ValueError, match="subject and object are the same node"):
        call(model, **graph)


def test_graph_with_zero_valid_nodes(model):
    graph = graph_inputs()
    graph["node_mask"][2] = False
    with pytest.raises(ValueError, match="caption 2 has zero valid nodes"):
        call(model, **graph)


@pytest.mark.parametrize(
    "field, shape",
    [
        ("node_attention_mask", (4, 3, 5)),
        ("node_mask", (4, 2)),
        ("relation_mask", (4, 3)),
        ("relation_attention_mask", (4, 2, 7)),
        ("relation_subject_index", (3, 2)),
    ],
)
def test_mismatched_shapes(model, field, shape):
    graph = graph_inputs()
    graph[field] = torch.ones(shape, dtype=graph[field].dtype)
    with pytest.raises(ValueError, match=field):
        call(model, **graph)


def test_relation_rows_for_other_caption_count(model):
    graph = graph_inputs()
    graph["relation_input_ids"] = graph["relation_input_ids"][:3]
    with pytest.raises(ValueError, match="relation_input_ids has shape"):
        call(model, **graph)


def test_node_ids_not_3d(model):
    graph = graph_inputs()
    graph["node_input_ids"] = graph["node_input_ids"][:, 0]
    with pytest.raises(ValueError, match=r"node_input_ids must be a \[captions, nodes, tokens\] tensor"):
        call(model, **graph)


def test_phrase_without_end_of_text_token(model):
    graph = graph_inputs()
    graph["node_input_ids"][1, 2] = 5
    graph["node_attention_mask"][1, 2] = 1
    with pytest.raises(ValueError, match=r"node_input_ids\[1, 2\] has no end-of-text token"):
        call(model, **graph)


def test_token_id_outside_vocabulary(model):
    graph = graph_inputs()
    graph["node_input_ids"][0, 0, 1] = 100
    with pytest.raises(ValueError, match="outside the vocabulary"):
        call(model, **graph)


@pytest.mark.parametrize("shape", [(4, 3, 16, 16), (4, 1, 32, 32), (3, 32, 32)])
def test_pixel_values_of_wrong_size(model, shape):
    with pytest.raises(ValueError, match="pixel_values has shape"):
        call(model, pixels=torch.zeros(shape), **graph_inputs())


def test_loss_needs_paired_batch(model):
    with pytest.raises(ValueError, match="the loss pairs image k with caption k"):
        with torch.no_grad():
            model(pixel_values=random_pixels(3), **graph_inputs(), return_loss=True)


def test_mismatched_sub_config_widths():
    with pytest.raises(ValueError, match=r"text_config.projection_dim \(16\) does not match projection_dim \(24\)"):
        OCCLIPConfig(text_config={"projection_dim": 16}, vision_config={"projection_dim": 24}, projection_dim=24)
    with pytest.raises(ValueError, match="not a multiple of"):
        OCCLIPConfig(binding_config={"hidden_size": 30, "num_attention_heads": 4})
    with pytest.raises(ValueError, match="vision_feature_layer"):
        OCCLIPConfig(binding_config={"vision_feature_layer": 20})
    with pytest.raises(ValueError, match="text_embedding_source"):
        OCCLIPConfig(text_embedding_source="mean")


def test_score_pairs_index_errors(model):
    with torch.no_grad():
        images = model.get_image_features(random_pixels(2))
        text = model.get_graph_features(**graph_inputs())
    with pytest.raises(ValueError, match="text_index holds values outside"):
        model.score_pairs(images, text, torch.tensor([0]), torch.tensor([9]))
    with pytest.raises(ValueError, match="global_logits has shape"):
        model.rerank(images, text, torch.zeros(2, 4))
