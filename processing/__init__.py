"""Scene graphs, tokenizer and processors for OC-CLIP and CLOC.

Importing this package registers `OCCLIPProcessor` with `AutoProcessor` for OC-CLIP checkpoints and marks it so
that `save_pretrained` writes `auto_map` and copies its code (loadable with `trust_remote_code=True`).
"""

from transformers import AutoProcessor

from modeling_occlip import OCCLIPConfig

from .clip_tokenizer import bundled_clip_tokenizer
from .dataset_parsing import add_scene_graphs
from .llm_parser import LLMSceneGraphParser
from .processing_occlip import OCCLIPProcessor
from .rule_parser import RuleSceneGraphParser
from .scene_graph import SceneGraph, SceneObject, SceneRelation

AutoProcessor.register(OCCLIPConfig, OCCLIPProcessor, exist_ok=True)
OCCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LLMSceneGraphParser",
    "OCCLIPProcessor",
    "RuleSceneGraphParser",
    "SceneGraph",
    "SceneObject",
    "SceneRelation",
    "add_scene_graphs",
    "bundled_clip_tokenizer",
]
