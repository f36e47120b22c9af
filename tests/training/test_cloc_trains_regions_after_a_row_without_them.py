"""Issue 14, item 5, end to end: a `metadata.jsonl` whose first row has no `regions` key used to lose every row's
regions (columns were taken from row 0), and `train_cloc.py` then trained with no region loss at all. Now the
columns come from the `docs/data.md` schema: the run trains the region loss, and a row without regions simply has
no boxes."""

import json

import pytest

from examples import train_cloc
from tests.training_fixtures import write_dataset, write_model_config


@pytest.mark.parametrize("first_row", ["no regions key", "regions null"])
def test_train_cloc_keeps_the_region_loss_when_the_first_row_has_no_regions(tmp_path, first_row):
    data = write_dataset(tmp_path / "data", rows=8)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    if first_row == "no regions key":
        del rows[0]["regions"]
    else:
        rows[0]["regions"] = None
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_model_config(tmp_path / "config.json", "cloc")
    argv = ["--train_data", str(data), "--output_dir", str(tmp_path / "out"), "--model_config", str(config)]
    argv += ["--per_device_train_batch_size", "8", "--max_steps", "1", "--disable_tqdm", "true"]
    metrics = train_cloc.main(argv)
    # One batch of all 8 rows: 7 carry a box, so the region terms are trained (they are 0 for a batch without boxes).
    assert metrics["skipped_rows"] == 0
    assert metrics["loss_region"] > 0
