"""Every `ModelOutput` defined in the two model folders is documented field by field in `modeling_clip.py`'s style:
an entry `name (`type` ...):` at the docstring's left margin for each dataclass field (inherited ones too), its
description indented below, and no field documented that the class does not have. Found by walking the modules, so
an output added later is checked without being listed here."""

import dataclasses
import inspect
import re

import pytest
from transformers.utils import ModelOutput

import modeling_cloc.modeling_cloc as cloc
import modeling_occlip.binding_occlip as occlip_binding
import modeling_occlip.modeling_occlip as occlip

OUTPUTS = sorted(
    {
        value
        for module in (cloc, occlip, occlip_binding)
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, ModelOutput) and value.__module__ == module.__name__
    },
    key=lambda output: output.__qualname__,
)
ENTRY = re.compile(r"^(\w+) \(`", re.MULTILINE)


def test_every_output_of_both_model_folders_is_found():
    names = {output.__name__ for output in OUTPUTS}
    assert {"CLOCOutput", "CLOCRegionOutput", "CLOCGroundingOutput", "CLOCVisionOutput"} <= names
    assert {"OCCLIPOutput", "OCCLIPImageFeatures", "OCCLIPGraphFeatures", "OCCLIPRerankOutput"} <= names


@pytest.mark.parametrize("output_class", OUTPUTS, ids=[output.__name__ for output in OUTPUTS])
def test_each_field_has_its_own_entry(output_class):
    doc = inspect.getdoc(output_class)
    documented = ENTRY.findall(doc)
    field_names = [field.name for field in dataclasses.fields(output_class)]
    assert sorted(documented) == sorted(field_names), f"{output_class.__name__}: documented {documented}"
    for name in field_names:  # a description follows each entry, indented
        entry = re.search(rf"^{name} \(`[^\n]*(?:\n(?! )[^\n]*)*?\n    \S", doc, re.MULTILINE)
        assert entry, f"{output_class.__name__}.{name} has no description"
