"""The labelled parser file and the P/R/F1 metric (hand-computed values)."""

import json
from pathlib import Path

import pytest

from processing import SceneGraph
from processing.parser_metrics import score_graphs

GOLD = Path(__file__).parents[1] / "data" / "parser_gold.jsonl"


def test_gold_file_has_100_valid_labelled_captions_of_both_kinds():
    rows = [json.loads(line) for line in GOLD.read_text().splitlines()]
    assert len(rows) >= 100
    assert {r["source"] for r in rows} == {"synthetic-template", "coco-style-hand-labelled"}
    for i, row in enumerate(rows):
        SceneGraph.from_dict(row["scene_graph"], caption_index=i)
        assert row["caption"].strip()


def graph(objects, relations=()):
    return SceneGraph.from_dict(
        {
            "objects": [{"name": n, "attributes": list(a)} for n, a in objects],
            "relations": [{"subject": s, "predicate": p, "object": o} for s, p, o in relations],
        }
    )


def test_metric_against_hand_computed_values():
    gold = [graph([("cube", ["red"]), ("sphere", ["blue"])], [(0, "left of", 1)]), graph([("dog", [])])]
    predicted = [
        graph([("cube", ["red"]), ("sphere", ["red"]), ("table", [])], [(1, "left of", 0)]),
        graph([("dog", [])]),
    ]
    scores = score_graphs(predicted, gold)
    # objects: 3 gold, 4 predicted, 3 hits; attributes: 2 gold, 2 predicted, 1 hit; relations: 1, 1, 0.
    assert scores["objects"]["precision"] == pytest.approx(3 / 4) and scores["objects"]["recall"] == 1.0
    assert scores["objects"]["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert scores["attributes"]["precision"] == scores["attributes"]["recall"] == scores["attributes"]["f1"] == 0.5
    assert scores["relations"]["f1"] == 0.0
    with pytest.raises(ValueError, match="1 predicted graphs for 2 gold"):
        score_graphs(predicted[:1], gold)
