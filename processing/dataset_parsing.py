"""Parse a `datasets` caption column once and store the scene graphs next to the captions (the parse cache).

Training then reads the `scene_graph` column and never parses on the fly. The column holds the JSON form of
`SceneGraph` (`docs/data.md`); its Arrow type is fixed by `SCENE_GRAPH_FEATURE` so that every shard agrees.
"""

from datasets import Dataset, Features, List, Value

from .rule_parser import RuleSceneGraphParser

SCENE_GRAPH_FEATURE = {
    "objects": List({"name": Value("string"), "attributes": List(Value("string"))}),
    "relations": List({"subject": Value("int32"), "predicate": Value("string"), "object": Value("int32")}),
}


def add_scene_graphs(
    dataset: Dataset,
    caption_column: str = "caption",
    output_column: str = "scene_graph",
    parser=None,
    num_proc: int | None = None,
    batch_size: int = 256,
    overwrite: bool = False,
) -> Dataset:
    """Return `dataset` with `output_column` holding each caption's scene graph (JSON form).

    A dataset that already has the column is returned unchanged unless `overwrite=True`. Parsing runs through
    `Dataset.map` (batched, `num_proc` processes; datasets caches the result for file-backed datasets) and is
    deterministic. Empty captions raise `ValueError` naming the row.
    """
    if caption_column not in dataset.column_names:
        raise ValueError(f"dataset has no column {caption_column!r} (columns: {dataset.column_names})")
    if output_column in dataset.column_names and not overwrite:
        return dataset
    parser = parser if parser is not None else RuleSceneGraphParser()
    features = Features({**dataset.features, output_column: SCENE_GRAPH_FEATURE})

    def parse(batch, indices):
        try:
            graphs = parser.parse_batch(batch[caption_column])
        except ValueError as error:
            raise ValueError(f"row {indices[0]}+: {error}") from None
        return {output_column: [graph.to_dict() for graph in graphs]}

    if output_column in dataset.column_names:
        dataset = dataset.remove_columns(output_column)
    return dataset.map(
        parse,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        num_proc=num_proc,
        features=features,
        desc="parsing captions",
    )
