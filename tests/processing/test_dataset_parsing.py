"""Parse cache: a datasets column parsed once (also multi-process), stored next to the captions, deterministic."""

import pytest
from datasets import Dataset

from processing import RuleSceneGraphParser, SceneGraph
from processing.dataset_parsing import add_scene_graphs

CAPTIONS = [
    "a red cube to the left of a blue sphere",
    "two dogs playing in the snow",
    "the cat is black",
    "a man holding an umbrella",
    "a dog chased by a boy",
    "very nice!",
]


def test_column_matches_parser_and_multiprocess_is_identical():
    dataset = Dataset.from_dict({"caption": CAPTIONS, "id": list(range(6))})
    one = add_scene_graphs(dataset, batch_size=4)
    two = add_scene_graphs(dataset, batch_size=2, num_proc=2)
    expected = [g.to_dict() for g in RuleSceneGraphParser().parse_batch(CAPTIONS)]
    assert one["scene_graph"] == expected == two["scene_graph"]
    assert one["id"] == list(range(6))
    assert [SceneGraph.from_dict(g) for g in one["scene_graph"]][2].node_texts == ["black cat"]


def test_existing_column_is_not_parsed_again():
    class Exploding:
        def parse_batch(self, captions):
            raise AssertionError("parsed again")

    parsed = add_scene_graphs(Dataset.from_dict({"caption": CAPTIONS[:2]}))
    assert add_scene_graphs(parsed, parser=Exploding()) is parsed
    with pytest.raises(AssertionError, match="parsed again"):
        add_scene_graphs(parsed, parser=Exploding(), overwrite=True)


def test_missing_column_and_empty_caption_errors():
    with pytest.raises(ValueError, match="no column 'text'"):
        add_scene_graphs(Dataset.from_dict({"caption": ["a cat"]}), caption_column="text")
    with pytest.raises(ValueError, match="caption 1 is empty"):
        add_scene_graphs(Dataset.from_dict({"caption": ["a cat", " "]}))
