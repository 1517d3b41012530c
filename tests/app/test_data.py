"""Dataset layouts and manifests: folders with and without splits, CSV and Parquet, bad labels, missing data."""

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from app.data import DatasetError, index_dataset


def _image(path: Path, colour: tuple[int, int, int] = (120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 32), colour).save(path, "JPEG")
    return path


def test_split_folders(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        for label in ("real", "ai_generated"):
            for i in range(3):
                _image(tmp_path / split / label / f"{i}.jpg")
    (tmp_path / "train" / "real" / "notes.txt").write_text("not an image, ignored")
    index = index_dataset(str(tmp_path))
    assert index.counts() == {s: {"real": 3, "ai_generated": 3} for s in ("train", "val", "test")}
    assert not index.notes
    assert set(index.split("val")["label"]) == {0, 1}


def test_flat_folder_gets_stable_carved_splits(tmp_path: Path) -> None:
    for label in ("real", "ai_generated"):
        for i in range(60):
            _image(tmp_path / label / f"{i}.png")
    first = index_dataset(str(tmp_path))
    second = index_dataset(str(tmp_path))
    pd.testing.assert_frame_equal(first.records, second.records)
    counts = first.counts()
    assert counts["val"]["real"] + counts["val"]["ai_generated"] > 0
    assert counts["test"]["real"] + counts["test"]["ai_generated"] > 0
    assert sum(sum(c.values()) for c in counts.values()) == 120
    assert first.notes


def test_csv_manifest_with_relative_paths_and_mixed_labels(tmp_path: Path) -> None:
    a = _image(tmp_path / "imgs" / "a.jpg")
    b = _image(tmp_path / "imgs" / "b.jpg")
    c = _image(tmp_path / "imgs" / "c.jpg")
    (tmp_path / "manifest.csv").write_text(
        f"path,label,split\nimgs/a.jpg,real,train\nimgs/b.jpg,1,test\n{c},ai_generated,val\n"
    )
    index = index_dataset(str(tmp_path / "manifest.csv"))
    columns = index.records[["path", "label", "split"]]
    rows = {Path(p).name: (label, split) for p, label, split in columns.itertuples(index=False)}
    assert rows == {"a.jpg": (0, "train"), "b.jpg": (1, "test"), "c.jpg": (1, "val")}
    assert Path(index.records["path"][0]).is_absolute() and a.exists() and b.exists()


def test_parquet_manifest(tmp_path: Path) -> None:
    paths = [str(_image(tmp_path / f"{i}.jpg")) for i in range(10)]
    frame = pd.DataFrame({"path": paths, "label": [0, 1] * 5})
    frame.to_parquet(tmp_path / "m.parquet")
    index = index_dataset(str(tmp_path / "m.parquet"))
    assert len(index.records) == 10
    assert set(index.records["label"]) == {0, 1}
    assert set(index.records["split"]) <= {"train", "val", "test"}


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found.*aipd data demo"):
        index_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        index_dataset(str(tmp_path / "empty"))
    (tmp_path / "bad.csv").write_text("file,class\nx.jpg,real\n")
    with pytest.raises(DatasetError, match="lacks column"):
        index_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "label.csv").write_text("path,label\nx.jpg,maybe\n")
    with pytest.raises(DatasetError, match="label 'maybe'"):
        index_dataset(str(tmp_path / "label.csv"))
