"""Scene graphs, tokenizer and processors for OC-CLIP and CLOC.

Importing this package registers `OCCLIPProcessor` / `CLOCProcessor` with `AutoProcessor` for OC-CLIP / CLOC checkpoints and marks it so
that `save_pretrained` writes `auto_map` and copies its code (loadable with `trust_remote_code=True`).

`import processing` loads only what the processors need. The offline data tools (VESL, the LLM parser, dataset
parsing, open_clip conversion, region phrases) load on first use of their names here, or directly as
`processing.vesl`, `processing.llm_parser`, ... : they pull in `datasets` and large model code that inference
does not need.
"""

import importlib

from transformers import AutoProcessor

from modeling_cloc import CLOCConfig
from modeling_occlip import OCCLIPConfig

from .boxes import box_problem, check_box
from .clip_tokenizer import bundled_clip_tokenizer
from .processing_cloc import CLOCProcessor, CLOCProcessorKwargs
from .processing_occlip import OCCLIPProcessor, OCCLIPProcessorKwargs
from .rule_parser import RuleSceneGraphParser
from .scene_graph import SceneGraph, SceneObject, SceneRelation, canonical_predicate, canonicalize_scene_graph

AutoProcessor.register(OCCLIPConfig, OCCLIPProcessor, exist_ok=True)
OCCLIPProcessor.register_for_auto_class("AutoProcessor")
AutoProcessor.register(CLOCConfig, CLOCProcessor, exist_ok=True)
CLOCProcessor.register_for_auto_class("AutoProcessor")

# Public names of the offline tools -> the submodule that defines them (imported on first access).
_LAZY = {
    "add_scene_graphs": "dataset_parsing",
    "LLMSceneGraphParser": "llm_parser",
    "cloc_from_open_clip": "open_clip_conversion",
    "from_open_clip": "open_clip_conversion",
    "occlip_from_open_clip": "open_clip_conversion",
    "alt_text_ngrams": "region_phrases",
    "extract_region_phrases": "region_phrases",
    "ImageCaptioner": "vesl",
    "OwlV2RegionDetector": "vesl",
    "VeslArguments": "vesl",
    "VeslStats": "vesl",
    "annotate": "vesl",
}


def __getattr__(name: str):
    """The offline tools' names, imported from their submodule on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later accesses skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CLOCProcessor",
    "CLOCProcessorKwargs",
    "ImageCaptioner",
    "LLMSceneGraphParser",
    "OCCLIPProcessor",
    "OCCLIPProcessorKwargs",
    "OwlV2RegionDetector",
    "RuleSceneGraphParser",
    "SceneGraph",
    "SceneObject",
    "SceneRelation",
    "VeslArguments",
    "VeslStats",
    "add_scene_graphs",
    "alt_text_ngrams",
    "annotate",
    "box_problem",
    "bundled_clip_tokenizer",
    "canonical_predicate",
    "canonicalize_scene_graph",
    "check_box",
    "cloc_from_open_clip",
    "extract_region_phrases",
    "from_open_clip",
    "occlip_from_open_clip",
]
