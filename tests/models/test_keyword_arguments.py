"""One rule for keyword arguments beyond a method's own, in both model folders: only the output flags the models
honour (`output_attentions`, `output_hidden_states`) pass; anything else, including transformers'
`TransformersKwargs` for packed or MoE language models that these models would silently ignore, is a `TypeError`
naming it."""

import pytest
import torch

from modeling_cloc import CLOCConfig, CLOCModel, CLOCVisionConfig, CLOCVisionModel
from modeling_occlip import OCCLIPTextModel, OCCLIPVisionModel
from modeling_occlip.configuration_occlip import OCCLIPTextConfig, OCCLIPVisionConfig
from tests.factories import (
    BOS_ID,
    EOS_ID,
    encode_graphs,
    example_graphs,
    random_pixels,
    tiny_occlip_model,
    tiny_text_config,
    tiny_vision_config,
)

# Keys of transformers' `TransformersKwargs` the models used to accept and drop without a word.
IGNORED_BEFORE = ("num_items_in_batch", "cu_seq_lens_q", "is_causal")


def _calls():
    """(name, call(**extra)) for every method that takes **kwargs, on tiny models of both families."""
    torch.manual_seed(0)
    pixels = random_pixels(2)
    captions = torch.tensor([[BOS_ID, 5, 6, EOS_ID], [BOS_ID, 7, EOS_ID, 0]])
    occlip = tiny_occlip_model().eval()
    graphs = encode_graphs(example_graphs()[:2])
    cloc = CLOCModel(
        CLOCConfig(text_config=tiny_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    ).eval()
    occlip_vision = OCCLIPVisionModel(OCCLIPVisionConfig(**tiny_vision_config())).eval()
    occlip_text = OCCLIPTextModel(OCCLIPTextConfig(**tiny_text_config())).eval()
    cloc_vision = CLOCVisionModel(CLOCVisionConfig(**tiny_vision_config())).eval()
    return {
        "OCCLIPModel.forward": lambda **extra: occlip(pixel_values=pixels, **graphs, **extra),
        "OCCLIPModel.get_image_features": lambda **extra: occlip.get_image_features(pixels, **extra),
        "OCCLIPModel.get_text_features": lambda **extra: occlip.get_text_features(captions, **extra),
        "OCCLIPVisionModel.forward": lambda **extra: occlip_vision(pixels, **extra),
        "OCCLIPTextModel.forward": lambda **extra: occlip_text(captions, **extra),
        "CLOCModel.forward": lambda **extra: cloc(input_ids=captions, pixel_values=pixels, **extra),
        "CLOCModel.get_image_features": lambda **extra: cloc.get_image_features(pixels, **extra),
        "CLOCModel.get_text_features": lambda **extra: cloc.get_text_features(captions, **extra),
        "CLOCVisionModel.forward": lambda **extra: cloc_vision(pixels, **extra),
    }


CALLS = _calls()


@pytest.mark.parametrize("method", list(CALLS))
@torch.no_grad()
def test_only_the_output_flags_pass(method):
    call = CALLS[method]
    plain = call()
    flagged = call(output_hidden_states=True, output_attentions=False)
    torch.testing.assert_close(flagged.to_tuple()[0], plain.to_tuple()[0])
    for name in (*IGNORED_BEFORE, "output_attention"):
        with pytest.raises(TypeError, match=rf"^{method}\(\) got unexpected keyword argument\(s\): '{name}'\.$"):
            call(**{name: 1})


def test_the_graph_hint_is_given_where_scene_graphs_do_not_belong():
    graphs = encode_graphs(example_graphs()[:1])
    captions = torch.tensor([[BOS_ID, 5, EOS_ID]])
    with pytest.raises(
        TypeError, match=r"'node_input_ids'.*\. Scene-graph inputs go to OCCLIPModel.get_graph_features"
    ):
        tiny_occlip_model().get_text_features(captions, node_input_ids=graphs["node_input_ids"])
    with pytest.raises(TypeError, match=r"'foo'\.$"):  # no hint for an argument that is not a graph input
        tiny_occlip_model().get_text_features(captions, foo=1)
