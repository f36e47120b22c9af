"""Issue 16, data in: a Hub id given to the trainer is read with `datasets.load_dataset`, downloaded or streamed
(`--streaming`), with its configuration. The Hub cannot be reached in tests, so `load_dataset` is replaced by a
stub holding the same rows as a local `save_to_disk` folder: the calls are checked, and each Hub run must train
exactly the weights of the local run in the same mode."""

import json

import datasets
import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from safetensors.torch import load_file

from examples import train_clip
from tests.training_fixtures import write_dataset, write_model_config


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """8 rows as a dataset with an `Image` column (bytes) and a `sentence` caption column."""
    folder = write_dataset(tmp_path_factory.mktemp("images"), rows=8)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    columns = {
        "image": [{"bytes": (folder / r["file_name"]).read_bytes(), "path": None} for r in rows],
        "sentence": [r["caption"] for r in rows],
    }
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())


def train(out, source, config, *extra):
    argv = ["--dataset_name", source, "--output_dir", str(out), "--model_config", str(config)]
    argv += ["--caption_column", "sentence", "--per_device_train_batch_size", "4", "--max_steps", "2"]
    train_clip.main([*argv, "--learning_rate", "1e-3", "--disable_tqdm", "true", *extra])
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("streaming", [False, True], ids=["downloaded", "streamed"])
def test_a_hub_id_is_downloaded_or_streamed_and_trains_like_the_same_rows_on_disk(
    table, tmp_path, monkeypatch, streaming
):
    table.save_to_disk(str(tmp_path / "saved"))
    config = write_model_config(tmp_path / "config.json", "clip")
    mode = ["--streaming", "true"] if streaming else []
    local = train(tmp_path / "local", str(tmp_path / "saved"), config, *mode)

    calls = []

    def load_dataset(name, config_name=None, split=None, streaming=False, **kwargs):
        calls.append((name, config_name, split, streaming, kwargs))
        return table.to_iterable_dataset() if streaming else table

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = train(tmp_path / "hub", "someone/pairs", config, "--dataset_config_name", "en", *mode)
    assert calls == [("someone/pairs", "en", "train", streaming, {})]
    assert local.keys() == hub.keys()
    different = [name for name in local if not torch.equal(local[name], hub[name])]
    assert not different, different
