"""Issue 16, data in: the trainer reads `datasets` inputs as transformers' `run_clip.py` does (`--dataset_name`, a
`save_to_disk` folder or a Hub id; `--dataset_config_name`; `--image_column` / `--caption_column`) through the
reader VESL shares (`processing.dataset_source`). Everything here is local: the Hub is replaced by a stub."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from examples import train_clip, train_cloc, train_occlip
from processing import dataset_source
from processing.vesl_data import list_input_shards
from tests.training_fixtures import write_dataset, write_model_config
from training import trainer as trainer_module
from training.data import BadSample, TrainingCollator, data_root, load_training_data
from training.trainer import default_processor, load_evaluation_rows

ROOT = Path(__file__).resolve().parents[2]
MAINS = {"clip": train_clip.main, "occlip": train_occlip.main, "cloc": train_cloc.main}


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("images"), rows=8)


def metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def as_table(folder: Path, caption_column: str = "text", extra: tuple = ()) -> Dataset:
    """The imagefolder's rows as an in-memory dataset: an `Image` column of bytes and the caption under
    `caption_column` (plus the `docs/data.md` fields named in `extra`, with their values)."""
    rows = metadata(folder)
    columns = {
        "image": [{"bytes": (folder / r["file_name"]).read_bytes(), "path": None} for r in rows],
        caption_column: [r["caption"] for r in rows],
    }
    for name in extra:
        columns[name] = [r[name] for r in rows]
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run(family, out, *flags, config):
    argv = ["--output_dir", str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1"]
    argv += ["--disable_tqdm", "true", "--learning_rate", "1e-3", "--model_config", str(config)]
    return MAINS[family]([*argv, *flags])


# ------------------------------------------------------------------------------ save_to_disk and Parquet inputs


def test_a_save_to_disk_folder_with_a_text_column_trains_two_steps(imagefolder, tmp_path):
    data = tmp_path / "saved"
    as_table(imagefolder).save_to_disk(str(data))
    before = files_under(data)
    config = write_model_config(tmp_path / "config.json", "clip")
    metrics = run(
        "clip",
        tmp_path / "out",
        "--dataset_name",
        str(data),
        "--caption_column",
        "text",
        "--max_steps",
        "2",
        config=config,
    )
    history = json.loads((tmp_path / "out" / "log_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2] and metrics["skipped_rows"] == 0
    assert torch.isfinite(torch.tensor(metrics["loss"])) and (tmp_path / "out" / "model.safetensors").is_file()
    assert files_under(data) == before  # nothing (no datasets cache file) written into the input
    streamed = run(
        "clip",
        tmp_path / "streamed",
        "--dataset_name",
        str(data),
        "--caption_column",
        "text",
        "--streaming",
        "true",
        "--max_steps",
        "2",
        config=config,
    )
    assert torch.isfinite(torch.tensor(streamed["loss"])) and files_under(data) == before
    # the same folder given as --train_data trains the same way
    run(
        "clip",
        tmp_path / "out2",
        "--train_data",
        str(data),
        "--caption_column",
        "text",
        "--max_steps",
        "1",
        config=config,
    )


def test_a_parquet_file_with_a_text_column_trains(imagefolder, tmp_path):
    path = tmp_path / "parquet" / "pairs.parquet"  # its folder is the input: the output goes beside it
    path.parent.mkdir()
    as_table(imagefolder).to_parquet(str(path))
    config = write_model_config(tmp_path / "config.json", "clip")
    metrics = run(
        "clip",
        tmp_path / "out",
        "--train_data",
        str(path),
        "--caption_column",
        "text",
        "--max_steps",
        "2",
        config=config,
    )
    assert metrics["skipped_rows"] == 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    rows = load_training_data(str(path), caption_column="text")[0]
    assert rows.column_names == ["image", "caption"] and rows[0]["caption"] == metadata(imagefolder)[0]["caption"]
    streamed = load_training_data(str(path), streaming=True, caption_column="text")[0]
    assert next(iter(streamed))["caption"] == metadata(imagefolder)[0]["caption"]


def test_a_missing_column_is_an_error_naming_the_available_columns(imagefolder, tmp_path):
    data = tmp_path / "saved"
    as_table(imagefolder).save_to_disk(str(data))
    config = write_model_config(tmp_path / "config.json", "clip")
    with pytest.raises(
        ValueError, match=r"--dataset_name .*saved: no caption column 'caption' \(columns: \['image', 'text'\]\)"
    ):
        run("clip", tmp_path / "out", "--dataset_name", str(data), "--max_steps", "1", config=config)
    with pytest.raises(ValueError, match=r"no image column 'picture' \(columns: \['image', 'text'\]\)"):
        run(
            "clip",
            tmp_path / "out",
            "--dataset_name",
            str(data),
            "--caption_column",
            "text",
            "--image_column",
            "picture",
            "--max_steps",
            "1",
            config=config,
        )
    with pytest.raises(ValueError, match="pass one of --train_data and --dataset_name"):
        run("clip", tmp_path / "out", "--train_data", str(data), "--dataset_name", str(data), config=config)
    assert not (tmp_path / "out").exists()


def test_the_named_columns_replace_the_default_ones(imagefolder, tmp_path):
    """`--caption_column alt` takes that column even when a `caption` column also exists (as `run_clip.py`)."""
    table = as_table(imagefolder, "caption").add_column("alt", [f"alt {i}" for i in range(8)])
    table = table.rename_column("image", "photo")
    table.save_to_disk(str(tmp_path / "saved"))
    rows, _ = load_training_data(str(tmp_path / "saved"), image_column="photo", caption_column="alt")
    assert sorted(rows.column_names) == ["caption", "image"] and rows[3]["caption"] == "alt 3"
    assert rows[3]["image"]["bytes"] == (imagefolder / "003.png").read_bytes()


def test_images_as_bytes_or_paths_inside_the_folder_only(imagefolder, tmp_path):
    """A column of raw bytes or of file paths is an image column; a path is read only inside the dataset folder."""
    data = tmp_path / "saved"
    names = [r["file_name"] for r in metadata(imagefolder)]
    (tmp_path / "secret.png").write_bytes((imagefolder / "000.png").read_bytes())
    paths = [*names[:3], str(tmp_path / "secret.png"), "../secret.png"]
    table = {
        "raw": [(imagefolder / n).read_bytes() for n in names[:5]],
        "file": paths,
        "text": [f"a photo {i}" for i in range(5)],
    }
    features = Features(raw=Value("binary"), file=Value("string"), text=Value("string"))
    Dataset.from_dict(table, features=features).save_to_disk(str(data))
    for name in names[:3]:
        (data / name).write_bytes((imagefolder / name).read_bytes())
    processor = default_processor("clip", 32)

    raw, _ = load_training_data(str(data), image_column="raw", caption_column="text")
    batch = TrainingCollator(processor, "clip", root=data_root(str(data)))([raw[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and int(batch["skipped_rows"]) == 0

    by_path, _ = load_training_data(str(data), image_column="file", caption_column="text")
    assert by_path[0]["image"] == {"bytes": None, "path": names[0]}
    collator = TrainingCollator(processor, "clip", on_bad_sample="skip", root=data_root(str(data)))
    batch = collator([{**by_path[i], "__index__": i} for i in range(5)])
    assert batch["pixel_values"].shape[0] == 3 and int(batch["skipped_rows"]) == 2
    with pytest.raises(BadSample, match=r"row 3 \(secret\.png\): unreadable image .*outside the dataset folder"):
        TrainingCollator(processor, "clip", root=data_root(str(data)))([{**by_path[3], "__index__": 3}])


@pytest.mark.parametrize("family", ["cloc", "occlip", "clip"])
def test_regions_scene_graphs_and_negatives_keep_their_meaning(imagefolder, tmp_path, family):
    """The optional `docs/data.md` columns of a `save_to_disk` folder reach the collator as they do from metadata.jsonl:
    CLOC trains its region loss on `regions`, OC-CLIP reads `scene_graph`, the CLIP baseline `negatives`."""
    table = as_table(imagefolder, "text", extra=("regions", "scene_graph"))
    table = table.add_column("negatives", [{"colour_replace": f"a pink square {i}"} for i in range(8)])
    table.save_to_disk(str(tmp_path / "saved"))
    rows, _ = load_training_data(str(tmp_path / "saved"), caption_column="text")
    expected = metadata(imagefolder)[5]
    assert rows[5]["regions"] == expected["regions"] and rows[5]["scene_graph"] == expected["scene_graph"]
    assert rows[5]["negatives"] == {"colour_replace": "a pink square 5"}
    config = write_model_config(tmp_path / "config.json", family)
    extra = ["--hard_negatives", "true"] if family == "clip" else []
    metrics = run(
        family,
        tmp_path / "out",
        "--dataset_name",
        str(tmp_path / "saved"),
        "--caption_column",
        "text",
        "--max_steps",
        "2",
        *extra,
        config=config,
    )
    assert metrics["skipped_rows"] == 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    if family == "cloc":
        assert metrics["loss_region"] > 0  # only present when the batch has boxes


def test_a_dataset_dict_split_and_configuration(imagefolder, tmp_path):
    table = as_table(imagefolder)
    DatasetDict(train=table.select(range(6)), validation=table.select(range(6, 8))).save_to_disk(
        str(tmp_path / "saved")
    )
    rows, _ = load_training_data(str(tmp_path / "saved"), split="validation", caption_column="text")
    assert [r["caption"] for r in rows] == [r["caption"] for r in metadata(imagefolder)[6:]]
    with pytest.raises(ValueError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        load_training_data(str(tmp_path / "saved"), split="test", caption_column="text")
    with pytest.raises(ValueError, match="a save_to_disk folder has no configurations"):
        load_training_data(str(tmp_path / "saved"), caption_column="text", config_name="en")
    # VESL reads the same folder through the same reader (a DatasetDict folder was not readable before)
    (shard,) = list_input_shards(str(tmp_path / "saved"), split="validation", text_column="text")
    assert [row.text for row in shard.rows()] == [r["caption"] for r in metadata(imagefolder)[6:]]


# ----------------------------------------------------------------------------------------------- Hub datasets


def test_a_hub_id_is_loaded_with_its_configuration_and_may_name_no_file(imagefolder, tmp_path, monkeypatch):
    """A Hub id goes to `datasets.load_dataset(id, config, split=..., streaming=...)` (stubbed: no network here);
    its rows' image bytes are used, and a row that names a local file is refused."""
    calls = []
    table = as_table(imagefolder, "sentence")
    hub_rows = table.cast_column("image", ImageFeature(decode=False)).to_list()
    hub_rows[1]["image"] = {"bytes": None, "path": str(imagefolder / "001.png")}

    def load_dataset(name, config_name=None, split=None, streaming=False):
        calls.append((name, config_name, split, streaming))
        stub = Dataset.from_list(hub_rows, features=table.features)
        return stub.to_iterable_dataset() if streaming else stub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = write_model_config(tmp_path / "config.json", "clip")
    flags = ["--dataset_name", "someone/pairs", "--dataset_config_name", "en", "--caption_column", "sentence"]
    metrics = run("clip", tmp_path / "out", *flags, "--max_steps", "2", "--on_bad_sample", "skip", config=config)
    assert calls == [("someone/pairs", "en", "train", False)] and metrics["skipped_rows"] == 1
    with pytest.raises(
        ValueError, match=r"row 1 \(001\.png\): unreadable image .*refused: this dataset has no local folder"
    ):
        run("clip", tmp_path / "out2", *flags, "--max_steps", "2", config=config)
    streamed = load_training_data("someone/pairs", streaming=True, caption_column="sentence", config_name="en")[0]
    assert calls[-1] == ("someone/pairs", "en", "train", True)
    assert next(iter(streamed))["caption"] == metadata(imagefolder)[0]["caption"]
    assert data_root("someone/pairs") is None  # no folder, so the collator reads no path
    assert dataset_source.is_hub_id("someone/pairs") and not dataset_source.is_hub_id(str(tmp_path))


# ---------------------------------------------------------------------------------------------------- safety


def test_output_dir_overlapping_a_local_dataset_name_is_refused_before_writing(imagefolder, tmp_path):
    data = tmp_path / "saved"
    as_table(imagefolder).save_to_disk(str(data))
    config = write_model_config(tmp_path / "config.json", "clip")
    before = files_under(tmp_path)
    for out, relation in ((data, "is"), (data / "out", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=rf"--output_dir .* {relation} --dataset_name"):
            run(
                "clip", out, "--dataset_name", str(data), "--caption_column", "text", "--max_steps", "1", config=config
            )
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------- issue 14 item 16: the datasets cache has no effect


def write_shards(imagefolder: Path, folder: Path) -> Path:
    """The imagefolder's rows as one WebDataset shard (`NNNN.png` + `NNNN.json` with the caption)."""
    folder.mkdir(parents=True)
    with tarfile.open(folder / "shard-000.tar", "w") as tar:
        for i, row in enumerate(metadata(imagefolder)):
            for name, payload in (
                (f"{i:04d}.png", (imagefolder / row["file_name"]).read_bytes()),
                (f"{i:04d}.json", json.dumps({"caption": row["caption"]}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_a_cold_datasets_cache_and_a_warm_one_train_the_same_weights(imagefolder, tmp_path, kind):
    """Issue 14 item 16 for the inputs that `datasets` does cache (an imagefolder is read in memory and has its own
    test in test_trainer_safety.py): two OC-CLIP runs in fresh processes share a fresh HF_HOME; the first builds
    the Arrow cache, the second reads it, and both give the same weights bit for bit."""
    if kind == "parquet":
        data = tmp_path / "parquet"
        data.mkdir()
        as_table(imagefolder, caption_column="caption").to_parquet(str(data / "pairs.parquet"))
    else:
        data = write_shards(imagefolder, tmp_path / "shards")
    config = write_model_config(tmp_path / "config.json", "occlip")
    hf_home = tmp_path / "hf"
    env = {**os.environ, "HF_HOME": str(hf_home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_DATASETS_CACHE", None)
    weights, cached = [], []
    for attempt in ("cold", "warm"):
        out = tmp_path / attempt
        command = [sys.executable, "examples/train_occlip.py", "--train_data", str(data), "--output_dir", str(out)]
        command += ["--model_config", str(config), "--max_steps", "3", "--per_device_train_batch_size", "4"]
        command += ["--disable_tqdm", "true", "--learning_rate", "1e-3"]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        weights.append(load_file(out / "model.safetensors"))
        cached.append(sorted(p.relative_to(hf_home) for p in hf_home.rglob("*.arrow")))
    assert cached[0] and cached[1] == cached[0]  # the first run built the cache; the second only read it
    different = [name for name in weights[0] if not torch.equal(weights[0][name], weights[1][name])]
    assert not different, f"{len(different)} of {len(weights[0])} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------------------------- issue 16: --eval_split


@pytest.fixture
def three_splits(imagefolder, tmp_path):
    """A saved DatasetDict: train = rows 0-3, validation = rows 4-5 (red, green), test = rows 6-7 (blue, yellow)."""
    table = as_table(imagefolder)
    parts = {"train": range(4), "validation": range(4, 6), "test": range(6, 8)}
    DatasetDict({name: table.select(rows) for name, rows in parts.items()}).save_to_disk(str(tmp_path / "saved"))
    captions = [r["caption"] for r in metadata(imagefolder)]
    return tmp_path / "saved", {name: [captions[i] for i in rows] for name, rows in parts.items()}


def test_eval_split_picks_the_split_and_defaults_to_validation(three_splits, imagefolder, tmp_path, monkeypatch):
    saved, captions = three_splits
    read = lambda *split: [r["caption"] for r in load_evaluation_rows(str(saved), 10, "image", "text", *split)]  # noqa: E731
    assert read() == captions["validation"]  # as run_clip.py; it was the train split before
    assert read("test") == captions["test"] and read("train") == captions["train"]
    with pytest.raises(
        ValueError, match=r"--eval_data .*saved: no split 'val' \(splits: \['train', 'validation', 'test'\]\)"
    ):
        read("val")
    # one set of rows: read whole; naming a split is an error rather than silently ignored
    assert [r["caption"] for r in load_evaluation_rows(str(imagefolder), 10)] == [
        r["caption"] for r in metadata(imagefolder)
    ]
    with pytest.raises(ValueError, match=r"--eval_split test: --eval_data .* is a single set of rows"):
        load_evaluation_rows(str(imagefolder), 10, split="test")
    # a Hub dataset without a validation split (load_dataset reads a local repository of data/<split>-*.parquet)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    as_table(imagefolder).select(range(2)).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    as_table(imagefolder).select(range(6, 8)).to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    real_load = datasets.load_dataset
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, config, split, streaming: real_load(str(repo), split=split)
    )
    with pytest.raises(ValueError, match=r"--eval_data someone/pairs: no split 'validation' \(Unknown split"):
        load_evaluation_rows("someone/pairs", 10, "image", "text")
    # a Hub dataset's rows may name no local file: the bytes are read
    assert [r["caption"] for r in load_evaluation_rows("someone/pairs", 10, "image", "text", "test")] == captions[
        "test"
    ]


def test_eval_split_without_eval_data_evaluates_that_split_of_the_training_data(three_splits, tmp_path, monkeypatch):
    saved, captions = three_splits
    seen = []

    def recording(*args, **kwargs):
        rows = load_evaluation_rows(*args, **kwargs)
        seen.append([r["caption"] for r in rows])
        return rows

    monkeypatch.setattr(trainer_module, "load_evaluation_rows", recording)
    config = write_model_config(tmp_path / "config.json", "clip")
    flags = ["--dataset_name", str(saved), "--caption_column", "text", "--max_steps", "1", "--eval_split", "test"]
    metrics = run("clip", tmp_path / "out", *flags, config=config)
    assert seen == [captions["test"]]
    assert any(k.startswith("eval/") for k in metrics)  # evaluated at the end, on the test rows
    card = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    (entry,) = card["model-index"][0]["results"][:1]
    assert entry["dataset"]["name"] == "saved" and entry["dataset"]["split"] == "test"
    with pytest.raises(ValueError, match=r"no split 'dev' \(splits: \['train', 'validation', 'test'\]\)"):
        run("clip", tmp_path / "out2", *flags[:-1], "dev", config=config)
