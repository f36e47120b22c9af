"""Scene graphs, parsers and processors for OC-CLIP and CLOC."""

from .scene_graph import SceneGraph, SceneObject, SceneRelation

__all__ = ["SceneGraph", "SceneObject", "SceneRelation"]
