"""The three dataset layouts of `docs/data.md` load to the same rows; row checks name the problem."""

import io
import json
import tarfile

import datasets
import pytest
from PIL import Image

from tests.training_fixtures import write_dataset
from training.data import BadSample, check_regions, load_image_text_dataset, open_image


def rows_of(dataset) -> list[tuple]:
    return sorted((r["caption"], open_image(r, "row").getpixel((10, 10))) for r in dataset)


def test_imagefolder_parquet_and_webdataset_give_the_same_rows(tmp_path):
    folder = write_dataset(tmp_path / "folder", rows=4)
    metadata = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    expected = rows_of(load_image_text_dataset(str(folder)))
    assert len(expected) == 4

    images = [{"bytes": (folder / m["file_name"]).read_bytes(), "path": None} for m in metadata]
    table = datasets.Dataset.from_dict(
        {"image": images, "caption": [m["caption"] for m in metadata]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (tmp_path / "parquet").mkdir()
    table.to_parquet(str(tmp_path / "parquet" / "part-0.parquet"))
    assert rows_of(load_image_text_dataset(str(tmp_path / "parquet"))) == expected

    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "shard-000.tar", "w") as tar:
        for i, m in enumerate(metadata):
            for name, payload in (
                (f"{i:04d}.png", (folder / m["file_name"]).read_bytes()),
                (f"{i:04d}.json", json.dumps({"caption": m["caption"]}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    assert rows_of(load_image_text_dataset(str(tmp_path / "shards"))) == expected


def test_row_checks_name_the_row_and_region():
    assert check_regions([{"bbox": [1, 2, 3, 4], "text": "a cat"}], "row 3") == ([[1.0, 2.0, 3.0, 4.0]], ["a cat"])
    with pytest.raises(BadSample, match=r"row 3, region 1: bbox \[5, 5, 2, 8\] needs x1 > x0"):
        check_regions([{"bbox": [1, 2, 3, 4], "text": "a"}, {"bbox": [5, 5, 2, 8], "text": "b"}], "row 3")
    with pytest.raises(BadSample, match=r"row 0, region 0: bbox \[1, 2, nan, 4\] holds NaN or infinity"):
        check_regions([{"bbox": [1, 2, float("nan"), 4], "text": "a"}], "row 0")
    with pytest.raises(BadSample, match="row 7: unreadable image"):
        open_image({"image": {"bytes": b"junk", "path": None}}, "row 7")
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert open_image({"image": {"bytes": buffer.getvalue(), "path": None}}, "row 0").size == (4, 4)


def test_webdataset_with_empty_regions_first_keeps_later_boxes(tmp_path):
    """Types come from the docs/data.md schema, not from the first samples (which once made `regions` a null column)."""
    pixels = io.BytesIO()
    Image.new("RGB", (8, 8)).save(pixels, format="PNG")

    def shard(name: str, regions: list) -> None:
        with tarfile.open(tmp_path / f"{name}.tar", "w") as tar:
            for i, region_list in enumerate(regions):
                fields = json.dumps({"caption": f"{name} {i}", "regions": region_list, "width": 8}).encode()
                for extension, payload in (("png", pixels.getvalue()), ("json", fields)):
                    info = tarfile.TarInfo(f"{name}{i:05d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    shard("a", [[]] * 1001)  # more than one writer batch of empty lists
    shard("b", [[{"bbox": [1, 2, 5, 6], "text": "red square", "score": 0.5}]] * 2)
    for streaming in (False, True):
        rows = list(load_image_text_dataset(str(tmp_path), streaming=streaming))
        assert len(rows) == 1003 and rows[0]["regions"] == [] and rows[0]["width"] == 8
        assert rows[-1]["regions"] == [{"bbox": [1.0, 2.0, 5.0, 6.0], "text": "red square", "score": 0.5}]
        assert check_regions(rows[-1]["regions"], "row") == ([[1.0, 2.0, 5.0, 6.0]], ["red square"])
