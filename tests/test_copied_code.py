"""Code that each model folder must carry itself (a saved folder's remote code may import only its own files)
stays identical between the copies, as transformers' "Copied from" check keeps its models in step."""

import inspect

import pytest

import modeling_cloc.modeling_cloc as cloc
import modeling_occlip.binding_occlip as occlip_binding
import modeling_occlip.modeling_occlip as occlip

COPIES = [
    (cloc._refuse_missing_weights, occlip._refuse_missing_weights),
    (cloc._load_clip, occlip._load_clip),
    (cloc._refuse_incomplete_load, occlip._refuse_incomplete_load),
    (cloc._hub_kwargs, occlip._hub_kwargs),
    (cloc.patch_position_features, occlip_binding.patch_position_features),
    (cloc._initialize_every_module, occlip._initialize_every_module),
    (cloc._init_clip_head, occlip._init_clip_head),
    (cloc._init_head, occlip._init_head),
]


@pytest.mark.parametrize("first, second", COPIES, ids=[a.__name__ for a, _ in COPIES])
def test_copies_in_the_two_model_folders_are_identical(first, second):
    assert inspect.getsource(first) == inspect.getsource(second), (
        f"{first.__module__}.{first.__name__} and {second.__module__}.{second.__name__} have drifted: "
        "change both copies together"
    )
