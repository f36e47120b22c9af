"""The scene-graph type: validation, exact JSON round trip, rendering, canonical form, truncation."""

import json

import pytest

from processing import SceneGraph, canonical_predicate, canonicalize_scene_graph

EXAMPLE = {
    "objects": [{"name": "cube", "attributes": ["small", "red"]}, {"name": "sphere", "attributes": []}],
    "relations": [{"subject": 0, "predicate": "to the left of", "object": 1}],
}


def test_json_round_trip_is_exact():
    graph = SceneGraph.from_dict(json.loads(json.dumps(EXAMPLE)))
    assert graph.to_dict() == EXAMPLE
    assert json.dumps(graph.to_dict()) == json.dumps(EXAMPLE)
    assert SceneGraph.from_dict(graph.to_dict()) == graph


def test_rendered_node_and_relation_text():
    graph = SceneGraph.from_dict(EXAMPLE)
    assert graph.node_texts == ["small red cube", "sphere"]
    assert graph.relation_texts == ["to the left of"]


def test_relations_default_to_empty():
    graph = SceneGraph.from_dict({"objects": [{"name": "dog"}]})
    assert graph.to_dict() == {"objects": [{"name": "dog", "attributes": []}], "relations": []}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"objects": []}, "caption 3: scene graph: 'objects' is empty"),
        ({"relations": []}, "caption 3: scene graph is missing the field 'objects'"),
        ({"objects": [{"name": " "}]}, r"caption 3: scene graph: objects\[0\].name must be a non-empty string"),
        ({"objects": [{"attributes": ["red"]}]}, r"objects\[0\] must be a dict with a 'name'"),
        ({"objects": [{"name": "a", "colour": "red"}]}, r"objects\[0\] has unknown field"),
        (
            {"objects": [{"name": "a"}, {"name": "b"}], "relations": [{"subject": 0, "predicate": "on", "object": 2}]},
            r"caption 3: scene graph: relations\[0\].object = 2 is not an index of the 2 objects",
        ),
        (
            {"objects": [{"name": "a"}], "relations": [{"subject": 0, "predicate": "on", "object": 0}]},
            r"relations\[0\] links object 0 to itself",
        ),
        ({"objects": [{"name": "a"}, {"name": "b"}], "relations": [{"subject": 0, "object": 1}]}, r"relations\[0\]"),
        (
            {
                "objects": [{"name": "a"}, {"name": "b"}],
                "relations": [{"subject": "0", "predicate": "on", "object": 1}],
            },
            r"relations\[0\].subject = '0'",
        ),
        ("a red cube", "caption 3: scene graph must be a dict"),
        ({"objects": [{"name": "a"}], "extra": 1}, "unknown field"),
    ],
)
def test_invalid_graphs_name_caption_and_field(data, message):
    with pytest.raises(ValueError, match=message):
        SceneGraph.from_dict(data, caption_index=3)


def test_canonicalize_merges_duplicate_nodes_remaps_relations_and_drops_self_loops():
    graph = SceneGraph.from_dict(
        {
            "objects": [
                {"name": "cat", "attributes": ["black"]},
                {"name": "mat"},
                {"name": "cat", "attributes": ["black"]},
            ],
            "relations": [
                {"subject": 0, "predicate": "on", "object": 1},
                {"subject": 2, "predicate": "on", "object": 1},
                {"subject": 2, "predicate": "next to", "object": 0},
                {"subject": 1, "predicate": "under", "object": 2},
            ],
        }
    )
    merged = canonicalize_scene_graph(graph)
    assert merged.to_dict() == {
        "objects": [{"name": "cat", "attributes": ["black"]}, {"name": "mat", "attributes": []}],
        "relations": [
            {"subject": 0, "predicate": "on", "object": 1},
            {"subject": 1, "predicate": "under", "object": 0},
        ],
    }


@pytest.mark.parametrize(
    "variant, canonical",
    [
        ("left of", "to the left of"),
        ("On the  Left of", "to the left of"),
        ("to the left side of", "to the left of"),
        ("right of", "to the right of"),
        ("at the right of", "to the right of"),
        ("to the left of", "to the left of"),
        ("in the front of", "in front of"),
        ("at the top of", "on top of"),
        ("on top of", "on top of"),
        ("next  to", "next to"),
        ("in between", "between"),
        ("Above", "above"),
        ("sitting on", "sitting on"),
    ],
)
def test_canonical_predicate(variant, canonical):
    assert canonical_predicate(variant) == canonical


def test_canonicalize_predicates_whitespace_and_repeated_triples():
    graph = {
        "objects": [{"name": " cube", "attributes": ["small  ", "red"]}, {"name": "sphere"}],
        "relations": [
            {"subject": 0, "predicate": "Left of", "object": 1},
            {"subject": 0, "predicate": "to the left  of", "object": 1},
            {"subject": 1, "predicate": "right of", "object": 0},
        ],
    }
    canonical = canonicalize_scene_graph(graph)
    assert canonical.to_dict() == {
        "objects": [{"name": "cube", "attributes": ["small", "red"]}, {"name": "sphere", "attributes": []}],
        "relations": [
            {"subject": 0, "predicate": "to the left of", "object": 1},
            {"subject": 1, "predicate": "to the right of", "object": 0},
        ],
    }
    assert canonicalize_scene_graph(canonical) == canonical  # idempotent
    assert canonicalize_scene_graph(SceneGraph.from_dict(graph)) == canonical


def test_canonicalize_can_keep_duplicate_nodes():
    graph = {
        "objects": [{"name": "cat"}, {"name": "cat"}],
        "relations": [{"subject": 0, "predicate": "left of", "object": 1}],
    }
    kept = canonicalize_scene_graph(graph, merge_duplicates=False)
    assert kept.node_texts == ["cat", "cat"] and kept.relation_texts == ["to the left of"]
    merged = canonicalize_scene_graph(graph)
    assert merged.node_texts == ["cat"] and merged.relations == ()


def test_truncate_keeps_relations_among_kept_nodes():
    graph = SceneGraph.from_dict(
        {
            "objects": [{"name": n} for n in "abcd"],
            "relations": [
                {"subject": 0, "predicate": "p", "object": 3},
                {"subject": 0, "predicate": "q", "object": 1},
                {"subject": 2, "predicate": "r", "object": 1},
            ],
        }
    )
    truncated, dropped = graph.truncate(max_nodes=3, max_relations=1)
    assert dropped
    assert truncated.node_texts == ["a", "b", "c"] and truncated.relation_texts == ["q"]
    same, dropped = graph.truncate(max_nodes=8, max_relations=8)
    assert same == graph and not dropped
