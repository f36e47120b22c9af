"""Scene graphs, tokenizer and processors for OC-CLIP and CLOC.

Importing this package registers `OCCLIPProcessor` / `CLOCProcessor` with `AutoProcessor` for OC-CLIP / CLOC checkpoints and marks it so
that `save_pretrained` writes `auto_map` and copies its code (loadable with `trust_remote_code=True`).
"""

from transformers import AutoProcessor

from modeling_cloc import CLOCConfig
from modeling_occlip import OCCLIPConfig

from .clip_tokenizer import bundled_clip_tokenizer
from .dataset_parsing import add_scene_graphs
from .llm_parser import LLMSceneGraphParser
from .open_clip_conversion import cloc_from_open_clip, from_open_clip, occlip_from_open_clip
from .processing_cloc import CLOCProcessor
from .processing_occlip import OCCLIPProcessor
from .region_phrases import alt_text_ngrams, extract_region_phrases
from .rule_parser import RuleSceneGraphParser
from .scene_graph import SceneGraph, SceneObject, SceneRelation, canonical_predicate, canonicalize_scene_graph
from .vesl import ImageCaptioner, OwlV2RegionDetector, VeslArguments, VeslStats, annotate

AutoProcessor.register(OCCLIPConfig, OCCLIPProcessor, exist_ok=True)
OCCLIPProcessor.register_for_auto_class("AutoProcessor")
AutoProcessor.register(CLOCConfig, CLOCProcessor, exist_ok=True)
CLOCProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CLOCProcessor",
    "ImageCaptioner",
    "LLMSceneGraphParser",
    "OCCLIPProcessor",
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
    "bundled_clip_tokenizer",
    "canonical_predicate",
    "canonicalize_scene_graph",
    "cloc_from_open_clip",
    "extract_region_phrases",
    "from_open_clip",
    "occlip_from_open_clip",
]
