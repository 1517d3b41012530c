"""Datasets: find the labelled images in any supported layout, then stream them through Ray Data.

Two steps, kept apart on purpose. ``index_dataset`` lists files on the driver (cheap: names only) and fixes the
train/val/test split; ``to_ray_dataset`` turns one split into a lazy Ray Data pipeline that reads, decodes (through
``app.images``, the one decoding path) and preprocesses or augments (through ``app.transforms``) inside
``map_batches``, so nothing is materialised and the work spreads over the cluster.

Layouts (see ARCHITECTURE.md): a folder with ``real/`` and ``ai_generated/``, optionally under ``train/``, ``val/``,
``test/``; or a CSV/Parquet manifest with columns ``path,label`` (and optionally ``split``). Paths may be local or any
URI pyarrow reads (``s3://``, ``gs://``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from app.errors import UserError
from app.storage import filesystem_of, is_uri

if TYPE_CHECKING:
    from app.config import ImageLimits, Settings

LABELS: dict[str, int] = {"real": 0, "ai_generated": 1}
CLASS_NAMES: tuple[str, str] = ("real", "ai_generated")
SPLITS: tuple[str, str, str] = ("train", "val", "test")
NO_SOURCE = "none"  # the generator family of a real photo
NO_TARGET = -1  # a photo's source class where the head is taught nothing (an unknown family, a degraded crop)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MANIFEST_SUFFIXES = frozenset({".csv", ".parquet", ".pq"})


class DatasetError(UserError, RuntimeError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclass
class DatasetIndex:
    """Every labelled file of a dataset with its split; built on the driver from file names only."""

    source: str
    # columns: path (str), label (int 0/1), split (train/val/test), generator (the family of an AI photo, "none" for
    # a real one, None when the dataset does not say)
    records: pd.DataFrame
    notes: list[str] = field(default_factory=list)

    @property
    def has_generators(self) -> bool:
        """Whether every AI photo's generator family is known (a manifest's `generator` column)."""
        ai = self.records[self.records["label"] == 1]
        return bool(len(ai)) and bool(ai["generator"].notna().all())

    def split(self, name: str) -> pd.DataFrame:
        return self.records[self.records["split"] == name].reset_index(drop=True)

    def source_families(self) -> list[str]:
        """The classes of the model's source head: NO_SOURCE, then every family of the training split's AI photos;
        empty (the binary head alone) when the dataset does not name them."""
        if not self.has_generators:
            return []
        train = self.split("train")
        return [NO_SOURCE, *sorted(set(train.loc[train["label"] == 1, "generator"]))]

    def require_splits(self, *names: str) -> None:
        """Fail with one line when a split the caller needs holds no image."""
        counts = self.counts()
        for name in names:
            if sum(counts[name].values()) == 0:
                raise DatasetError(f"the {name} split of {self.source} is empty")

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            part = self.records[self.records["split"] == split]
            out[split] = {name: int((part["label"] == LABELS[name]).sum()) for name in CLASS_NAMES}
        return out


def resolve_data_path(settings: Settings) -> str:
    """The dataset to use: ``--data`` / settings, else the demo set (built on first use)."""
    if settings.data.path:
        return settings.data.path
    demo_dir = settings.demo_data_dir
    if not (demo_dir / "summary.json").is_file():
        from app.demo import build_demo_dataset
        from app.logging import get_logger

        get_logger("aipd.data").info("building_demo_dataset", out=str(demo_dir))
        build_demo_dataset(
            demo_dir,
            images_per_class=settings.data.demo_images_per_class,
            size=settings.data.demo_size,
            seed=settings.data.demo_seed,
        )
    return str(demo_dir)


def index_dataset(uri: str, *, val_fraction: float = 0.15, test_fraction: float = 0.15) -> DatasetIndex:
    """List a dataset's images and labels; splits missing on disk are carved out by a stable hash of the path."""
    fs, root = _filesystem(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DatasetError(f"dataset not found: {uri} (build the demo set with `aipd data demo`, or pass --data PATH)")
    if info.type == pafs.FileType.File:
        if posixpath.splitext(root)[1].lower() not in MANIFEST_SUFFIXES:
            raise DatasetError(f"{uri} is a file but not a CSV or Parquet manifest")
        records = _read_manifest(fs, root, uri)
    else:
        records = _with_folder_generators(_walk_folder(fs, root, uri), fs, root, uri)
    if records.empty:
        raise DatasetError(
            f"no images found in {uri}: expected real/ and ai_generated/ folders (optionally under train/ val/ test/) "
            "or a manifest with columns path,label"
        )
    notes: list[str] = []
    records, carved = _fill_missing_splits(records, val_fraction, test_fraction)
    if carved:
        notes.append(f"split {', '.join(carved)} carved from the data by a stable hash of each path")
    return DatasetIndex(source=uri, records=records, notes=notes)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return filesystem_of(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for unknown schemes or missing credentials
        raise DatasetError(f"cannot open {uri}: {err}") from err


def _join(uri_root: str, fs_path: str, fs_root: str) -> str:
    """Give back a path in the same form the user gave (a URI stays a URI) so workers can reopen it."""
    if not is_uri(uri_root):
        return fs_path
    scheme = uri_root.split("://", 1)[0]
    return f"{scheme}://{fs_path}"


def _walk_folder(fs: pafs.FileSystem, root: str, uri: str) -> pd.DataFrame:
    rows: list[tuple[str, int, str | None]] = []
    selector = pafs.FileSelector(root, recursive=True)
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if posixpath.splitext(info.path)[1].lower() not in IMAGE_SUFFIXES:
            continue
        parts = posixpath.relpath(info.path, root).split("/")
        label = next((LABELS[p] for p in reversed(parts[:-1]) if p in LABELS), None)
        if label is None:
            continue
        split = next((p for p in parts[:-1] if p in SPLITS), None)
        rows.append((_join(uri, info.path, root), label, split))
    rows.sort()
    frame = pd.DataFrame(rows, columns=["path", "label", "split"])
    frame["generator"] = None
    return frame


FOLDER_MANIFEST = "manifest.csv"


def _with_folder_generators(records: pd.DataFrame, fs: pafs.FileSystem, root: str, uri: str) -> pd.DataFrame:
    """A folder that carries a manifest.csv with a `generator` column (the demo set does) names each AI photo's
    generator family; the folders still decide the labels and splits."""
    manifest = posixpath.join(root, FOLDER_MANIFEST)
    if records.empty or fs.get_file_info(manifest).type != pafs.FileType.File:
        return records
    frame, paths = _read_manifest_table(fs, manifest, _join(uri, manifest, root), {"path"})
    if "generator" not in frame.columns:
        return records
    family = dict(zip(paths, frame["generator"], strict=True))
    out = records.copy()
    out["generator"] = _generators(out["label"], [family.get(path) for path in out["path"]])
    return out


def _generators(labels: Iterable[int], families: Iterable[Any]) -> list[str | None]:
    """ "none" for every real photo; an AI photo's family as given, None when it has none."""
    out: list[str | None] = []
    for label, family in zip(labels, families, strict=True):
        known = isinstance(family, str) and family.strip() != ""
        out.append(NO_SOURCE if label == 0 else (family.strip() if known else None))
    return out


def source_targets(records: pd.DataFrame, families: list[str]) -> np.ndarray:
    """Each record's class of the source head (its index in ``families``), -1 where it has none the head knows:
    the loss ignores those photos."""
    if not families or "generator" not in records.columns:
        return np.full(len(records), NO_TARGET, dtype=np.int64)
    position = {family: i for i, family in enumerate(families)}
    return np.asarray([position.get(g, NO_TARGET) for g in records["generator"]], dtype=np.int64)


def _read_manifest_table(fs: pafs.FileSystem, root: str, uri: str, required: set[str]) -> tuple[pd.DataFrame, list]:
    """A CSV or Parquet manifest's rows, and its paths made absolute (relative ones are relative to the manifest)."""
    suffix = posixpath.splitext(root)[1].lower()
    try:
        if suffix == ".csv":
            import pyarrow.csv as pacsv

            with fs.open_input_stream(root) as stream:
                table = pacsv.read_csv(stream)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(root, filesystem=fs)
    except Exception as err:
        raise DatasetError(f"cannot read manifest {uri}: {err}") from err
    frame = table.to_pandas()
    missing = required - set(frame.columns)
    if missing:
        needs = ",".join(sorted(required))
        raise DatasetError(f"manifest {uri} lacks column(s) {', '.join(sorted(missing))}; it needs {needs}")
    base = posixpath.dirname(root)
    paths = [
        p if (is_uri(p) or posixpath.isabs(p)) else _join(uri, posixpath.normpath(posixpath.join(base, p)), root)
        for p in frame["path"].astype(str)
    ]
    return frame, paths


def _read_manifest(fs: pafs.FileSystem, root: str, uri: str) -> pd.DataFrame:
    frame, paths = _read_manifest_table(fs, root, uri, {"path", "label"})
    labels = [_parse_label(v, uri) for v in frame["label"]]
    splits: Iterable[Any] = frame["split"] if "split" in frame.columns else [None] * len(frame)
    clean_splits = [s if isinstance(s, str) and s in SPLITS else None for s in splits]
    families = frame["generator"] if "generator" in frame.columns else [None] * len(frame)
    return pd.DataFrame(
        {"path": paths, "label": labels, "split": clean_splits, "generator": _generators(labels, families)}
    )


def index_catalog(sources: Iterable[str]) -> pd.DataFrame:
    """Every file to scan, with its label when a manifest gives one (-1 otherwise): columns path, label.

    A folder contributes every regular file under it, images or not (a catalog's stray files get a row saying why
    they could not be scanned), hidden files aside; a manifest (CSV/Parquet with a `path` column) its rows.
    """
    frames = []
    for uri in sources:
        fs, root = _filesystem(uri)
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DatasetError(f"nothing to scan at {uri}: no such folder or manifest")
        if info.type == pafs.FileType.File:
            if posixpath.splitext(root)[1].lower() not in MANIFEST_SUFFIXES:
                raise DatasetError(f"{uri} is a file but not a CSV or Parquet manifest; give its folder instead")
            frame, paths = _read_manifest_table(fs, root, uri, {"path"})
            labels = [_parse_label(v, uri) for v in frame["label"]] if "label" in frame.columns else [-1] * len(paths)
            frames.append(pd.DataFrame({"path": paths, "label": labels}))
            continue
        paths = sorted(
            _join(uri, entry.path, root)
            for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True))
            if entry.type == pafs.FileType.File
            and not any(part.startswith(".") for part in posixpath.relpath(entry.path, root).split("/"))
        )
        frames.append(pd.DataFrame({"path": paths, "label": [-1] * len(paths)}))
    catalog = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"path": [], "label": []})
    return catalog.drop_duplicates("path").reset_index(drop=True)


def _parse_label(value: Any, uri: str) -> int:
    text = str(value).strip().lower()
    if text in LABELS:
        return LABELS[text]
    if text in {"0", "1", "0.0", "1.0"}:
        return int(float(text))
    raise DatasetError(f"manifest {uri} has label {value!r}; use real/ai_generated or 0/1")


def _stable_unit(path: str) -> float:
    digest = hashlib.sha1(path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _fill_missing_splits(
    records: pd.DataFrame, val_fraction: float, test_fraction: float
) -> tuple[pd.DataFrame, list[str]]:
    """Files without a split get one; a split that exists on disk is never mixed with carved files."""
    present = set(records["split"].dropna())
    unassigned = records["split"].isna()
    if not unassigned.any():
        return records, []
    wanted = [s for s in ("val", "test") if s not in present]
    carved: list[str] = []
    splits = records["split"].copy()
    for idx in records.index[unassigned]:
        u = _stable_unit(records.at[idx, "path"])
        choice = "train"
        if "test" in wanted and u < test_fraction:
            choice = "test"
        elif "val" in wanted and test_fraction <= u < test_fraction + val_fraction:
            choice = "val"
        splits.at[idx] = choice
        if choice != "train" and choice not in carved:
            carved.append(choice)
    out = records.copy()
    out["split"] = splits
    return out, sorted(carved)


@dataclass(frozen=True)
class DecodeOptions:
    """What a Ray Data worker needs to turn a path into model-ready uint8 crops."""

    crop_size: int
    train: bool
    limits: ImageLimits
    augment: Any = None  # app.transforms.AugmentConfig when train is True
    log_format: str = "console"
    # Evaluation only: named, picklable changes to the decoded photo (None: the photo as it is); each file is read
    # and decoded once and gives one crop per variant, tagged in the `variant` column.
    variants: tuple[tuple[str, Callable[[Any], Any] | None], ...] = ()
    seed: int | None = None  # training: the data order and the augmentations follow it, so a rerun repeats them
    # training: a crop a degradation changed gets NO_TARGET, so the source head learns on clean crops only
    source_clean_only: bool = False
    # the Ray Train workers decode and augment (`pixels_on_device`); the tasks only read and check (`read_batch`)
    on_workers: bool = False

    def to_plain(self) -> dict[str, Any]:
        """What a training worker needs of these options, as plain values (they cross in the loop's config)."""
        return {
            "crop_size": self.crop_size,
            "train": self.train,
            "limits": self.limits.model_dump(),
            "augment": dataclasses.asdict(self.augment) if self.augment is not None else None,
            "seed": self.seed,
            "source_clean_only": self.source_clean_only,
            "on_workers": self.on_workers,
        }

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> DecodeOptions:
        from app.config import ImageLimits
        from app.degradations import DegradationConfig
        from app.transforms import AugmentConfig

        augment = plain.get("augment")
        if augment is not None:
            degradations = {k: tuple(v) if isinstance(v, list) else v for k, v in augment["degradations"].items()}
            augment = AugmentConfig(DegradationConfig(**degradations), flip_prob=augment["flip_prob"])
        return cls(**{**plain, "limits": ImageLimits(**plain["limits"]), "augment": augment})


def read_batch(batch: dict[str, np.ndarray], options: DecodeOptions) -> dict[str, np.ndarray]:
    """Read and check one batch, for workers that decode on their device (`pixels_on_device`): the checked bytes in
    `data`; unreadable files are dropped and logged, never fatal."""
    from app.images import ImageError, check_header, read_image_bytes
    from app.logging import configure_logging, get_logger

    configure_logging(options.log_format)
    limits = options.limits
    kept: list[int] = []
    data: list[bytes] = []
    for i, path in enumerate(batch["path"]):
        try:
            encoded = read_image_bytes(str(path), max_bytes=limits.max_bytes)
            check_header(encoded, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        except (ImageError, OSError) as err:
            get_logger("aipd.data").warning("image_skipped", path=str(path), reason=str(err))
            continue
        kept.append(i)
        data.append(encoded)
    given_sources = batch["source"] if "source" in batch else np.full(len(batch["path"]), NO_TARGET)
    encoded_column = np.empty(len(data), dtype=object)
    encoded_column[:] = data
    return {
        "data": encoded_column,
        "label": np.asarray(batch["label"], dtype=np.float32)[kept],
        "source": np.asarray(given_sources, dtype=np.int64)[kept],
        "path": np.asarray(batch["path"], dtype=object)[kept],
        "variant": np.full(len(kept), "", dtype=object),
    }


def pixels_on_device(
    batch: dict[str, np.ndarray], options: DecodeOptions, device: Any
) -> tuple[Any, np.ndarray, np.ndarray]:
    """A `read_batch` batch decoded and preprocessed on ``device``, as `decode_batch` does it on a CPU: (uint8
    (N, crop, crop, 3) tensor on the device, labels, source targets); a photo that does not decode is dropped and
    logged. Training draws the same augmentation per photo as `decode_batch` (`app.transforms`), from the same seed."""
    import torch

    from app.logging import get_logger
    from app.pixels import decode_crops, decode_upright
    from app.transforms import train_augment_tensor

    photos = [bytes(data) for data in batch["data"]]
    sources = np.asarray(batch["source"], dtype=np.int64).copy()
    if options.train:
        rng = np.random.default_rng(_batch_seed(batch["path"], options.seed))
        decoded = decode_upright(photos, device, options.limits)
    else:
        decoded = decode_crops(photos, options.crop_size, device, options.limits)
    crops, kept = [], []
    for i, (image, path) in enumerate(zip(decoded, batch["path"], strict=True)):
        if isinstance(image, Exception):
            get_logger("aipd.data").warning("image_skipped", path=str(path), reason=str(image))
            continue
        if options.train:
            image, degraded = train_augment_tensor(image, options.crop_size, options.augment, rng)
            if degraded and options.source_clean_only:
                sources[i] = NO_TARGET
        crops.append(torch.as_tensor(image).to(device))
        kept.append(i)
    size = options.crop_size
    pixels = torch.stack(crops) if crops else torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device)
    return pixels, np.asarray(batch["label"], dtype=np.float32)[kept], sources[kept]


def decode_batch(batch: dict[str, np.ndarray], options: DecodeOptions) -> dict[str, np.ndarray]:
    """Read, decode and preprocess one batch; unreadable files are dropped and logged, never fatal."""
    from app.images import ImageError, read_and_decode
    from app.logging import configure_logging, get_logger
    from app.transforms import eval_preprocess, train_augment_degraded

    configure_logging(options.log_format)
    rng = np.random.default_rng(_batch_seed(batch["path"], options.seed))
    variants = options.variants or (("", None),)
    crops: list[np.ndarray] = []
    labels: list[int] = []
    paths: list[str] = []
    names: list[str] = []
    sources: list[int] = []
    given_sources = batch["source"] if "source" in batch else np.full(len(batch["path"]), NO_TARGET)
    for path, label, source in zip(batch["path"], batch["label"], given_sources, strict=True):
        try:
            image = read_and_decode(str(path), options.limits)
        except (ImageError, OSError) as err:
            get_logger("aipd.data").warning("image_skipped", path=str(path), reason=str(err))
            continue
        if options.train:
            crop, degraded = train_augment_degraded(image, options.crop_size, options.augment, rng)
            crops.append(crop)
            names.append("")
            if degraded and options.source_clean_only:
                source = NO_TARGET
        else:
            for name, change in variants:
                crops.append(eval_preprocess(change(image) if change is not None else image, options.crop_size))
                names.append(name)
        labels += [int(label)] * (len(crops) - len(labels))
        paths += [str(path)] * (len(crops) - len(paths))
        sources += [int(source)] * (len(crops) - len(sources))
    size = options.crop_size
    return {
        "image": np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8),
        "label": np.asarray(labels, dtype=np.float32),
        "source": np.asarray(sources, dtype=np.int64),
        "path": np.asarray(paths, dtype=object),
        "variant": np.asarray(names, dtype=object),
    }


def _batch_seed(paths: np.ndarray, seed: int | None) -> list[int] | None:
    """A batch's augmentation seed from its files and the run's seed: the same batch augments the same way in a
    rerun, and a batch of other files (the next epoch's order) differently."""
    if seed is None:
        return None
    return [seed, zlib.crc32("\n".join(str(p) for p in paths).encode())]


def to_ray_dataset(records: pd.DataFrame, options: DecodeOptions, *, batch_size: int = 32, blocks: int | None = None):
    """A lazy Ray Data pipeline over ``records``; every iteration re-reads and, for training, re-augments."""
    import ray.data

    columns = ["path", "label", "source"] if "source" in records.columns else ["path", "label"]
    rows = records[columns].to_dict("records")
    if not rows:
        raise DatasetError("the split is empty: nothing to read")
    num_blocks = blocks or max(1, min(len(rows) // batch_size, 64))
    ds = ray.data.from_items(rows, override_num_blocks=num_blocks)
    if options.train:
        # Shuffling the rows while they are still only paths is cheap; shuffling decoded pixels is not. A seed gives
        # every epoch its own order, the same in every rerun.
        ds = ds.random_shuffle(seed=_shuffle_seed(options.seed))
    step = read_batch if options.on_workers else decode_batch
    return ds.map_batches(step, fn_kwargs={"options": options}, batch_size=batch_size, batch_format="numpy")


def _shuffle_seed(seed: int | None) -> Any:
    from ray.data import RandomSeedConfig

    return None if seed is None else RandomSeedConfig(seed=seed, reseed_after_execution=True)


@dataclass
class CheckReport:
    """What ``aipd data check`` prints: images per split and class, and every file that failed to decode."""

    counts: dict[str, dict[str, int]]
    bad_files: list[tuple[str, str]]
    notes: list[str]

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())


def check_dataset(index: DatasetIndex, limits: ImageLimits) -> CheckReport:
    """Decode every file once (on Ray, in parallel) and list the ones that fail."""
    import ray.data

    def probe(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from app.images import ImageError, read_and_decode

        reasons: list[str] = []
        for path in batch["path"]:
            try:
                read_and_decode(str(path), limits)
                reasons.append("")
            except (ImageError, OSError) as err:
                reasons.append(str(err) or type(err).__name__)
        return {"path": batch["path"], "reason": np.asarray(reasons, dtype=object)}

    rows = index.records[["path"]].to_dict("records")
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // 64, 64)))
    result = ds.map_batches(probe, batch_size=64, batch_format="numpy").to_pandas()
    bad = result[result["reason"] != ""]
    bad_paths = set(bad["path"])
    good = index.records[~index.records["path"].isin(bad_paths)]
    counts = DatasetIndex(index.source, good).counts()
    return CheckReport(
        counts=counts, bad_files=sorted(zip(bad["path"], bad["reason"], strict=True)), notes=list(index.notes)
    )
