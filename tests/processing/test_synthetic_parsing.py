"""Training and evaluation see the same graphs: the rule parser reproduces the synthetic generator's stored graphs
(captions and hard negatives), and `processor(text=)` equals `processor(scene_graphs=)` on them."""

import random
from collections import Counter, defaultdict

import pytest
import torch

from processing import RuleSceneGraphParser, SceneGraph, canonicalize_scene_graph
from tests.processing.test_occlip_processor import tiny_processor
from training.synthetic import COLOURS, NEGATIVE_KINDS, SHAPES, SceneConfig, _caption, _graph, generate_scene
from training.synthetic import SceneObject as DrawnObject

NUM_SAMPLES = 1000
NUM_NEGATIVE_SAMPLES = 300


@pytest.fixture(scope="module")
def parser():
    return RuleSceneGraphParser()


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    """1000 generated samples, sizes on for every other one (images are drawn in memory and dropped)."""
    rng = random.Random(0)
    return [generate_scene(rng, SceneConfig(use_sizes=bool(i % 2)))[1] for i in range(NUM_SAMPLES)]


def scene_of(sample: dict) -> tuple[list, list, bool]:
    """The generator's objects, relations and size flag behind a stored graph."""
    graph = sample["scene_graph"]
    with_size = len(graph["objects"][0]["attributes"]) == 2
    objects = [
        DrawnObject(o["name"], o["attributes"][-1], o["attributes"][0] if with_size else "medium")
        for o in graph["objects"]
    ]
    relations = [(r["subject"], r["predicate"], r["object"]) for r in graph["relations"]]
    assert _caption(objects, relations, with_size) == sample["caption"]
    return objects, relations, with_size


def negative_graphs(objects: list, relations: list, with_size: bool) -> dict:
    """Every graph each negative kind of the generator can make from a scene, keyed by (kind, caption)."""
    graphs = defaultdict(list)

    def add(kind, objs, rels):
        graphs[kind, _caption(objs, rels, with_size)].append(_graph(objs, rels, with_size))

    def copy():
        return [DrawnObject(o.shape, o.colour, o.size) for o in objects]

    if len(objects) >= 2:
        swapped = copy()
        swapped[0].colour, swapped[1].colour = objects[1].colour, objects[0].colour
        add("attribute_swap", swapped, relations)
        s, p, o = relations[0]
        add("relation_swap", objects, [(o, p, s), *relations[1:]])
    for index in range(len(objects)):
        for shape in SHAPES:
            replaced = copy()
            replaced[index].shape = shape
            add("shape_replace", replaced, relations)
        for colour in COLOURS:
            recoloured = copy()
            recoloured[index].colour = colour
            add("colour_replace", recoloured, relations)
    return graphs


def structure(graph) -> tuple[list, list]:
    """Canonical node texts and (subject, predicate, object) text triples: the graph up to node numbering, which
    is all of it once repeated mentions are merged (node texts are then unique)."""
    graph = canonicalize_scene_graph(graph)
    texts = graph.node_texts
    return sorted(texts), sorted((texts[r.subject], r.predicate, texts[r.object]) for r in graph.relations)


def test_samples_cover_every_caption_form(samples):
    forms = Counter(
        (len(s["scene_graph"]["objects"]), len(s["scene_graph"]["objects"][0]["attributes"])) for s in samples
    )
    assert set(forms) == {(n, a) for n in (1, 2, 3) for a in (1, 2)}
    predicates = {r["predicate"] for s in samples for r in s["scene_graph"]["relations"]}
    assert predicates == {"to the left of", "to the right of", "above", "below"}


def test_parser_reproduces_every_stored_graph(parser, samples):
    parsed = parser.parse_batch([s["caption"] for s in samples])
    mismatches = [
        (s["caption"], graph.to_dict())
        for s, graph in zip(samples, parsed)
        if canonicalize_scene_graph(graph) != canonicalize_scene_graph(s["scene_graph"])
    ]
    assert not mismatches, f"{len(mismatches)} of {len(samples)} differ, e.g. {mismatches[:3]}"
    # The parser's output is canonical already and the generator's graphs are: they are equal as they stand.
    assert [g.to_dict() for g in parsed] == [s["scene_graph"] for s in samples]


def test_negatives_parse_to_the_changed_graph(parser, samples):
    cases = []
    for sample in samples[:NUM_NEGATIVE_SAMPLES]:
        candidates = negative_graphs(*scene_of(sample))
        for kind, caption in sample["negatives"].items():
            expected = candidates[kind, caption]
            assert expected, f"{kind} negative {caption!r} is not one the generator can make"
            assert len({str(structure(g)) for g in expected}) == 1
            cases.append((kind, caption, expected[0]))
    assert {kind for kind, _, _ in cases} == set(NEGATIVE_KINDS)
    parsed = parser.parse_batch([caption for _, caption, _ in cases])
    mismatches = [
        (kind, caption, graph.to_dict())
        for (kind, caption, expected), graph in zip(cases, parsed)
        if structure(graph) != structure(expected)
    ]
    assert not mismatches, f"{len(mismatches)} of {len(cases)} negatives differ, e.g. {mismatches[:3]}"


@torch.no_grad()
def test_processor_text_and_stored_graph_give_identical_tensors(samples):
    processor = tiny_processor()
    captions = [s["caption"] for s in samples[:300]]
    graphs = [s["scene_graph"] for s in samples[:300]]
    batches = [(captions, graphs)] + [([c], [g]) for c, g in zip(captions[:30], graphs[:30])]
    for text, scene_graphs in batches:
        from_text, from_graph = processor(text=text), processor(scene_graphs=scene_graphs)
        assert from_text.keys() == from_graph.keys() == set(processor.model_input_names) - {"pixel_values"}
        for key in from_graph:
            torch.testing.assert_close(from_text[key], from_graph[key], atol=0, rtol=0, msg=f"{key}: {text[:2]}")
    assert processor.prepare_graphs(graphs) == [SceneGraph.from_dict(g) for g in graphs]
