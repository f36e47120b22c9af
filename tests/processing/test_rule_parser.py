"""Rule (spaCy) scene-graph parser: fixed captions with known graphs, fallback, errors, and fuzzing."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing import RuleSceneGraphParser, SceneGraph


@pytest.fixture(scope="module")
def parser():
    return RuleSceneGraphParser()


def triples(graph: SceneGraph) -> list[tuple[str, str, str]]:
    nodes = graph.node_texts
    return [(nodes[r.subject], r.predicate, nodes[r.object]) for r in graph.relations]


@pytest.mark.parametrize(
    "caption, nodes, relations",
    [
        (
            "a red cube to the left of a blue sphere",
            ["red cube", "blue sphere"],
            [("red cube", "to the left of", "blue sphere")],
        ),
        ("a red cube and a blue sphere", ["red cube", "blue sphere"], []),
        (
            "A blue circle above a yellow square",
            ["blue circle", "yellow square"],
            [("blue circle", "above", "yellow square")],
        ),
        (
            "a green triangle to the right of a purple diamond",
            ["green triangle", "purple diamond"],
            [("green triangle", "to the right of", "purple diamond")],
        ),
        ("the cat is black", ["black cat"], []),
        ("a dog chased by a boy", ["dog", "boy"], [("boy", "chased", "dog")]),
        ("A man holding an umbrella", ["man", "umbrella"], [("man", "holding", "umbrella")]),
        (
            "a tennis ball on top of a wooden table",
            ["tennis ball", "wooden table"],
            [("tennis ball", "on top of", "wooden table")],
        ),
        ("a photo of a cat on a mat", ["cat", "mat"], [("cat", "on", "mat")]),
        ("a cat and a dog on a mat", ["cat", "dog", "mat"], [("cat", "on", "mat"), ("dog", "on", "mat")]),
        (
            "A man sitting on a bench next to a black dog",
            ["man", "bench", "black dog"],
            [("man", "sitting on", "bench"), ("man", "next to", "black dog")],
        ),
        (
            "a small red cube is left of a large green cylinder and a blue sphere is below it",
            ["small red cube", "large green cylinder", "blue sphere"],
            [
                ("small red cube", "to the left of", "large green cylinder"),
                ("blue sphere", "below", "large green cylinder"),
            ],
        ),
    ],
)
def test_known_graphs(parser, caption, nodes, relations):
    graph = parser.parse(caption)
    assert graph.node_texts == nodes
    assert sorted(triples(graph)) == sorted(relations)


@pytest.mark.parametrize(
    "caption, predicate",
    [
        ("a red cube left of a blue sphere", "to the left of"),
        ("a red cube on the left of a blue sphere", "to the left of"),
        ("a red cube on the right side of a blue sphere", "to the right of"),
        ("a red cube at the top of a blue sphere", "on top of"),
        ("a red cube in front of a blue sphere", "in front of"),
        ("a red cube next to a blue sphere", "next to"),
    ],
)
def test_predicate_variants_parse_to_one_spelling(parser, caption, predicate):
    assert triples(parser.parse(caption)) == [("red cube", predicate, "blue sphere")]


def test_repeated_mentions_are_one_node(parser):
    graph = parser.parse("a red circle to the left of a blue square, and a blue square above a green cross")
    assert graph.to_dict() == {
        "objects": [
            {"name": "circle", "attributes": ["red"]},
            {"name": "square", "attributes": ["blue"]},
            {"name": "cross", "attributes": ["green"]},
        ],
        "relations": [
            {"subject": 0, "predicate": "to the left of", "object": 1},
            {"subject": 1, "predicate": "above", "object": 2},
        ],
    }


@pytest.mark.parametrize(
    "caption",
    [
        "a cat and a dog on a mat",  # the relation may be shared: dependency rules decide
        "a man sitting on a bench",
        "the cat is black",
        "two dogs on a mat",
        "a red cube a blue sphere",
    ],
)
def test_non_template_captions_are_not_read_as_templates(parser, caption):
    assert parser._template_graph(parser.nlp(caption)) is None


def test_caption_without_noun_falls_back_to_one_node(parser):
    assert parser.parse("  very   nice!  ").to_dict() == {
        "objects": [{"name": "very nice!", "attributes": []}],
        "relations": [],
    }


def test_batch_equals_single_and_is_deterministic(parser):
    captions = ["a red cube to the left of a blue sphere", "two dogs playing in the snow", "it is"]
    batch = parser.parse_batch(captions)
    assert batch == [parser.parse(c) for c in captions] == parser.parse_batch(captions)


def test_errors_name_the_caption(parser):
    with pytest.raises(ValueError, match="caption 1 is empty"):
        parser.parse_batch(["a cat", " \n\t"])
    with pytest.raises(TypeError, match="caption 2 must be a string"):
        parser.parse_batch(["a cat", "a dog", None])
    with pytest.raises(TypeError, match="takes a list"):
        parser.parse_batch("a cat")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    st.lists(
        st.one_of(
            st.text(max_size=60),
            st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=2000),
            st.lists(
                st.sampled_from(["a", "red", "cube", "left", "of", "and", "it", "on", "the", ",", "is"]), max_size=30
            ).map(" ".join),
        ),
        min_size=100,
        max_size=100,
    )
)
def test_fuzz_only_documented_errors(parser, captions):
    """100 examples x 100 strings (unicode, punctuation, very long): only the documented errors, valid graphs."""
    for caption in captions:
        if not caption.strip():
            with pytest.raises(ValueError, match="caption 0 is empty"):
                parser.parse(caption)
    graphs = parser.parse_batch([c for c in captions if c.strip()])
    for graph in graphs:
        assert SceneGraph.from_dict(graph.to_dict()) == graph


def test_real_sugarcrepe_sample_parses_without_fallback(parser):
    """60 COCO captions from SugarCrepe (written by others): every one yields real objects and a valid graph."""
    import json
    from pathlib import Path

    rows = json.loads((Path(__file__).parents[1] / "data" / "sugarcrepe_sample.json").read_text())
    captions = [row["caption"] for row in rows.values()]
    graphs = parser.parse_batch(captions)
    for caption, graph in zip(captions, graphs):
        assert graph.objects[0].name != " ".join(caption.split()), caption
        assert SceneGraph.from_dict(graph.to_dict()) == graph
    assert sum(bool(g.relations) for g in graphs) >= 45
