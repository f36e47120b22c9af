"""Precision/recall/F1 of predicted scene graphs against gold ones: objects, attribute-object bindings and
relation triples, each matched on lemmas as multisets per caption (spec: parser quality benchmark)."""

from collections import Counter
from collections.abc import Callable

from .scene_graph import SceneGraph


def graph_items(graph: SceneGraph, lemma: Callable[[str], str]) -> dict[str, Counter]:
    """The three item multisets of one graph: objects, (attribute, object) pairs, (subject, predicate, object)."""
    names = [lemma(o.name) for o in graph.objects]
    return {
        "objects": Counter(names),
        "attributes": Counter((lemma(a), names[i]) for i, o in enumerate(graph.objects) for a in o.attributes),
        "relations": Counter((names[r.subject], lemma(r.predicate), names[r.object]) for r in graph.relations),
    }


def score_graphs(
    predicted: list[SceneGraph], gold: list[SceneGraph], lemma: Callable[[str], str] = str.lower
) -> dict[str, dict[str, float]]:
    """Micro-averaged precision, recall and F1 per item kind over paired lists of graphs."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted graphs for {len(gold)} gold graphs")
    totals = {kind: Counter() for kind in ("objects", "attributes", "relations")}
    for pred, ref in zip(predicted, gold):
        p, g = graph_items(pred, lemma), graph_items(ref, lemma)
        for kind in totals:
            totals[kind]["hit"] += sum((p[kind] & g[kind]).values())
            totals[kind]["pred"] += sum(p[kind].values())
            totals[kind]["gold"] += sum(g[kind].values())
    scores = {}
    for kind, t in totals.items():
        precision = t["hit"] / t["pred"] if t["pred"] else 1.0
        recall = t["hit"] / t["gold"] if t["gold"] else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[kind] = {"precision": precision, "recall": recall, "f1": f1, "gold": t["gold"]}
    return scores
