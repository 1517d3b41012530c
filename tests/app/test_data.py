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


def test_the_source_heads_classes_come_from_the_training_split_and_unknown_families_are_ignored(
    tmp_path: Path,
) -> None:
    import numpy as np

    from app.data import NO_SOURCE, source_targets

    rows = [
        ("r1.jpg", "real", "train", ""),
        ("a1.jpg", "ai_generated", "train", "gan"),
        ("a2.jpg", "ai_generated", "train", "diffusion"),
        ("a3.jpg", "ai_generated", "test", "autoregressive"),  # a family training never saw
        ("r2.jpg", "real", "val", ""),
    ]
    for name, *_ in rows:
        _image(tmp_path / name)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label", "split", "generator"]).to_csv(manifest, index=False)

    index = index_dataset(str(manifest))
    families = index.source_families()
    assert families == [NO_SOURCE, "diffusion", "gan"]
    targets = source_targets(index.records, families)
    assert dict(zip(index.records["path"].map(lambda p: Path(p).name), targets, strict=True)) == {
        "r1.jpg": 0,
        "a1.jpg": 2,
        "a2.jpg": 1,
        "a3.jpg": -1,
        "r2.jpg": 0,
    }
    assert (source_targets(index.records, []) == -1).all()
    assert source_targets(index.records, families).dtype == np.int64


def test_a_dataset_that_does_not_name_its_generators_trains_no_source_head(tmp_path: Path) -> None:
    for name in ("real/a.jpg", "ai_generated/b.jpg"):
        _image(tmp_path / name)
    assert index_dataset(str(tmp_path)).source_families() == []


def test_decoding_carries_each_photos_source_class(tmp_path: Path) -> None:
    import numpy as np

    from app.config import ImageLimits
    from app.data import DecodeOptions, decode_batch

    paths = [str(_image(tmp_path / f"{i}.jpg")) for i in range(3)]
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    batch = {
        "path": np.array([paths[0], str(tmp_path / "broken.jpg"), paths[1], paths[2]], dtype=object),
        "label": np.array([0, 1, 1, 1]),
        "source": np.array([0, 2, 1, -1]),
    }
    out = decode_batch(batch, DecodeOptions(crop_size=32, train=False, limits=ImageLimits()))
    assert out["source"].tolist() == [0, 1, -1]  # the unreadable photo's row went with it
    assert out["image"].shape == (3, 32, 32, 3)


def test_with_source_clean_only_a_degraded_crop_teaches_the_source_head_nothing(tmp_path: Path) -> None:
    """A degradation wipes the traces the source head reads: such a crop keeps its label, loses its source class."""
    import numpy as np

    from app.config import ImageLimits
    from app.data import NO_TARGET, DecodeOptions, decode_batch
    from app.degradations import DegradationConfig
    from app.transforms import AugmentConfig

    paths = [str(_image(tmp_path / f"{i}.jpg")) for i in range(3)]
    batch = {"path": np.array(paths, dtype=object), "label": np.array([0, 1, 1]), "source": np.array([0, 1, 2])}

    def sources(blur_prob: float, clean_only: bool) -> list[int]:
        degradations = DegradationConfig(blur_prob=blur_prob, downscale_prob=0.0, jpeg_prob=0.0)
        options = DecodeOptions(
            crop_size=32,
            train=True,
            limits=ImageLimits(),
            augment=AugmentConfig(degradations=degradations),
            seed=0,
            source_clean_only=clean_only,
        )
        out = decode_batch(batch, options)
        assert out["label"].tolist() == [0, 1, 1]
        return out["source"].tolist()

    assert sources(blur_prob=1.0, clean_only=True) == [NO_TARGET] * 3
    assert sources(blur_prob=0.0, clean_only=True) == [0, 1, 2]
    assert sources(blur_prob=1.0, clean_only=False) == [0, 1, 2]


def test_workers_that_decode_get_the_tasks_crops_labels_and_sources(tmp_path: Path) -> None:
    """`train.decode_on: workers`: the tasks only read and check (`read_batch`), the worker decodes and augments
    (`pixels_on_device`, here on the CPU): the same rows as `decode_batch`, the same crops for validation, the same
    augmentation draws for training (Pillow's and torch's filters round differently, within a grey level or two)."""
    import numpy as np
    import torch

    from app.config import ImageLimits
    from app.data import DecodeOptions, decode_batch, pixels_on_device, read_batch
    from app.degradations import DegradationConfig
    from app.transforms import AugmentConfig
    from tests.app.test_pixels import photo

    paths = []
    for i in range(4):
        photo(160 + 8 * i, 120, seed=i).save(tmp_path / f"{i}.jpg", quality=90)
        paths.append(str(tmp_path / f"{i}.jpg"))
    (tmp_path / "broken.jpg").write_bytes(b"not a photo")
    batch = {
        "path": np.array([paths[0], str(tmp_path / "broken.jpg"), *paths[1:]], dtype=object),
        "label": np.array([0, 1, 1, 0, 1]),
        "source": np.array([0, 2, 1, 0, 2]),
    }
    augment = AugmentConfig(DegradationConfig(blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5))
    readable = {key: np.delete(values, 1) for key, values in batch.items()}
    for train in (False, True):
        options = DecodeOptions(
            crop_size=64, train=train, limits=ImageLimits(), augment=augment if train else None, seed=3
        )
        # training seeds each batch's draws from its paths: the worker's batch is the one the task passed on
        expected = decode_batch(readable if train else batch, options)
        read = read_batch(batch, dataclasses_replace(options, on_workers=True))
        assert read["path"].tolist() == expected["path"].tolist(), "the unreadable file is dropped by the task"
        worker_options = DecodeOptions.from_plain(dataclasses_replace(options, on_workers=True).to_plain())
        pixels, labels, sources = pixels_on_device(read, worker_options, torch.device("cpu"))
        assert pixels.shape == expected["image"].shape and pixels.dtype == torch.uint8
        assert labels.tolist() == expected["label"].tolist() and sources.tolist() == expected["source"].tolist()
        gap = np.abs(pixels.numpy().astype(float) - expected["image"]).mean()
        assert gap == 0.0 if not train else gap <= 2.0, (train, gap)


def dataclasses_replace(options, **changes):
    import dataclasses

    return dataclasses.replace(options, **changes)
