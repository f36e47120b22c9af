"""Code that each model folder must carry itself (a saved folder's remote code may import only its own files)
stays identical between the copies, as transformers' "Copied from" check keeps its models in step."""

import inspect

import pytest

import modeling_cloc.configuration_cloc as cloc_config
import modeling_cloc.modeling_cloc as cloc
import modeling_occlip.binding_occlip as occlip_binding
import modeling_occlip.configuration_occlip as occlip_config
import modeling_occlip.modeling_occlip as occlip

COPIES = [
    # Loading and building from CLIP.
    (cloc._refuse_missing_weights, occlip._refuse_missing_weights),
    (cloc._load_clip, occlip._load_clip),
    (cloc._refuse_incomplete_load, occlip._refuse_incomplete_load),
    (cloc._hub_kwargs, occlip._hub_kwargs),
    (cloc._clip_config_fields, occlip._clip_config_fields),
    (cloc._load_clip_weights, occlip._load_clip_weights),
    (cloc.CLOCPreTrainedModel.from_pretrained, occlip.OCCLIPPreTrainedModel.from_pretrained),
    # Initialisation of the towers, projections, logit scale and new heads.
    (cloc._initialize_every_module, occlip._initialize_every_module),
    (cloc._init_clip_head, occlip._init_clip_head),
    (cloc._init_head, occlip._init_head),
    (cloc.CLOCPreTrainedModel.initialize_weights, occlip.OCCLIPPreTrainedModel.initialize_weights),
    (cloc.CLOCVisionModel.initialize_weights, occlip.OCCLIPVisionModel.initialize_weights),
    (cloc.CLOCModel.clamped_logit_scale, occlip.OCCLIPModel.clamped_logit_scale),
    # Outputs and flags as transformers handles them.
    (cloc.CLOCOutput.to_tuple, occlip.OCCLIPOutput.to_tuple),
    (cloc._output_flag, occlip._output_flag),
    # Input checks.
    (cloc._check_kwargs, occlip._check_kwargs),
    (cloc._check_pixel_values, occlip._check_pixel_values),
    # The standalone vision towers' export to a plain CLIP vision checkpoint.
    (cloc.CLOCVisionModel.clip_vision_config, occlip.OCCLIPVisionModel.clip_vision_config),
    (cloc.CLOCVisionModel.clip_state_dict, occlip.OCCLIPVisionModel.clip_state_dict),
    (cloc.CLOCVisionModel.export_clip_vision, occlip.OCCLIPVisionModel.export_clip_vision),
    # Config post-init.
    (cloc_config._own_sub_config_types, occlip_config._own_sub_config_types),
    (cloc_config._check_projection_dims, occlip_config._check_projection_dims),
    (cloc.patch_position_features, occlip_binding.patch_position_features),
]


def _name(function) -> str:
    return f"{function.__module__}.{function.__qualname__}"


@pytest.mark.parametrize("cloc_copy, occlip_copy", COPIES, ids=[cloc_copy.__qualname__ for cloc_copy, _ in COPIES])
def test_copies_in_the_two_model_folders_are_identical(cloc_copy, occlip_copy):
    assert inspect.getsource(cloc_copy) == inspect.getsource(occlip_copy), (
        f"{_name(cloc_copy)} and {_name(occlip_copy)} have drifted: change both copies together"
    )
