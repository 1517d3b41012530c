"""Build the embedded demo dataset: plan the scenes, fit the decoders, render every pair, write the files.

Every random draw of a scene comes from a generator seeded by (seed, scene index), so the bytes written do not
depend on how the work is split between processes. Two worker processes with one torch thread each: on two
cores that is faster than one process with two threads, and far more robust when other work shares the
machine (OpenMP threads spin against each other under contention).
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from app.demo.recipe import (
    CHUNK,
    DECODER_HOLDOUT_SCENES,
    DECODER_STEPS,
    DECODER_TRAIN_SCENES,
    DECODER_WEIGHTS,
    LABELS,
    RECIPE_VERSION,
    SPLIT_FRACTIONS,
    STREAM_SPLIT,
)
from app.demo.sources import SPLITS


@dataclass
class DemoSummary:
    """What a build produced: counts per split and class, where, how long, from which photos."""

    out_dir: Path
    images_per_class: int
    size: int
    seed: int
    counts: dict[str, dict[str, int]]
    sources: dict[str, list[str]]
    build_seconds: float
    decoders: dict[str, dict[str, float]] = field(default_factory=dict)
    hard_cases: dict[str, int] = field(default_factory=dict)
    decoder_steps: int = DECODER_STEPS
    phase_seconds: dict[str, float] = field(default_factory=dict)
    recipe_version: int = RECIPE_VERSION
    cached: bool = False  # True when an earlier build was returned instead of building

    @property
    def total_images(self) -> int:
        return sum(n for per_label in self.counts.values() for n in per_label.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["total_images"] = self.total_images
        return d

    @classmethod
    def from_dict(cls, d: dict, out_dir: Path) -> DemoSummary:
        keys = set(cls.__dataclass_fields__)
        values = {k: v for k, v in d.items() if k in keys and k not in ("out_dir", "cached")}
        return cls(**values, out_dir=out_dir, cached=True)


@dataclass(frozen=True)
class _ScenePlan:
    index: int
    split: str


def _plan(images_per_class: int, seed: int) -> list[_ScenePlan]:
    n = images_per_class
    n_train = round(n * SPLIT_FRACTIONS["train"])
    n_val = round(n * SPLIT_FRACTIONS["val"])
    order = np.random.default_rng([seed, STREAM_SPLIT]).permutation(n)
    split_of = {}
    for rank, index in enumerate(order):
        split_of[int(index)] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return [_ScenePlan(i, split_of[i]) for i in range(n)]


def _cache_key(images_per_class: int, size: int, seed: int, decoder_steps: int) -> dict:
    return {
        "images_per_class": images_per_class,
        "size": size,
        "seed": seed,
        "decoder_steps": decoder_steps,
        "recipe_version": RECIPE_VERSION,
    }


def _cached(out_dir: Path, key: dict) -> DemoSummary | None:
    path = out_dir / "summary.json"
    if not path.is_file() or not (out_dir / "manifest.csv").is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if any(d.get(k) != v for k, v in key.items()):
        return None
    return DemoSummary.from_dict(d, out_dir)


def build_demo_dataset(
    out_dir: Path,
    images_per_class: int = 1400,
    size: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    *,
    workers: int | None = None,
    decoder_steps: int = DECODER_STEPS,
) -> DemoSummary:
    """Build the demo dataset in out_dir, or return the one already there if it was built with the same parameters.

    Writes out_dir/{train,val,test}/{real,ai_generated}/*.jpg, manifest.csv (path,label,split,scene_id,source,
    ...) and summary.json. progress(done, total) is called as images are written. workers: processes (default
    up to 2; 0 = this process). decoder_steps: fewer fit the decoders worse; only for tests and quick looks.
    Worker processes are spawned: a script that calls this needs the usual `if __name__ == "__main__":` guard.
    """
    out_dir = Path(out_dir)
    if images_per_class < 10:
        raise ValueError(f"images_per_class must be at least 10 (got {images_per_class}): every split needs scenes")
    if size < 32 or size % 4:
        raise ValueError(f"size must be a multiple of 4 and at least 32 (got {size})")
    key = _cache_key(images_per_class, size, seed, decoder_steps)
    cached = _cached(out_dir, key)
    if cached is not None:
        return cached

    from app.demo import worker  # torch loads here, not when the package is imported

    start = time.perf_counter()
    timings: dict[str, float] = {}
    _clear(out_dir)
    for split in SPLITS:
        for label in LABELS:
            (out_dir / split / label).mkdir(parents=True, exist_ok=True)
    plans = _plan(images_per_class, seed)
    total = 2 * len(plans)
    if progress:
        progress(0, total)

    n_workers = min(2, os.cpu_count() or 1) if workers is None else workers
    with _executor(n_workers) as run:
        timings["start_workers"] = time.perf_counter() - start
        n_fit = DECODER_TRAIN_SCENES + DECODER_HOLDOUT_SCENES
        fit_chunks = [(seed, size, i, min(i + CHUNK, n_fit)) for i in range(0, n_fit, CHUNK)]
        images = np.concatenate(list(run(worker.render_decoder_training, fit_chunks)))
        fit_args = [(kind, images, DECODER_TRAIN_SCENES, seed, decoder_steps) for kind in DECODER_WEIGHTS]
        fitted = dict(zip(DECODER_WEIGHTS, run(worker.fit, fit_args), strict=True))
        timings["fit_decoders"] = time.perf_counter() - start - sum(timings.values())
        decoders = {kind: state for kind, (state, _, _) in fitted.items()}
        chunks = [(seed, size, str(out_dir), plans[i : i + CHUNK], decoders) for i in range(0, len(plans), CHUNK)]
        rows: list[dict] = []
        for chunk_rows in run(worker.render_pairs, chunks):
            rows.extend(chunk_rows)
            if progress:
                progress(len(rows), total)
        timings["render_pairs"] = time.perf_counter() - start - sum(timings.values())

    rows.sort(key=lambda r: (r["split"], r["label"], r["scene_id"]))
    _write_manifest(out_dir / "manifest.csv", rows)
    summary = DemoSummary(
        out_dir=out_dir,
        images_per_class=images_per_class,
        size=size,
        seed=seed,
        counts={s: {lab: sum(r["split"] == s and r["label"] == lab for r in rows) for lab in LABELS} for s in SPLITS},
        sources={
            s: sorted({src for r in rows if r["split"] == s for src in r["source"].split("+") if src}) for s in SPLITS
        },
        build_seconds=round(time.perf_counter() - start, 2),
        decoders={k: {"psnr_db": round(p, 2), "fit_seconds": round(t, 2)} for k, (_, p, t) in fitted.items()},
        hard_cases={
            h: sum(h in r["hard_case"].split("+") for r in rows) for h in ("denoised", "softened", "added_noise")
        },
        decoder_steps=decoder_steps,
        phase_seconds={k: round(v, 2) for k, v in timings.items()},
    )
    (out_dir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _clear(out_dir: Path) -> None:
    """Remove what an earlier (different or interrupted) build left: only the paths a build writes."""
    for name in (*SPLITS, "manifest.csv", "summary.json"):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_manifest(path: Path, rows: list[dict]) -> None:
    columns = ["path", "label", "split", "scene_id", "source", "generator", "hard_case", "jpeg_quality"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class _executor:
    """map() over a spawn pool of single-threaded workers, or in this process when workers == 0."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool = None

    def __enter__(self) -> Callable[[Callable, Iterable], Iterable]:
        from app.demo import worker

        if self.workers <= 0:
            self._threads = worker.enter_inline()
            return lambda fn, items: map(fn, items)
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(self.workers, initializer=worker.init_worker)
        return lambda fn, items: self.pool.imap(fn, items)

    def __exit__(self, *exc) -> None:
        from app.demo import worker

        if self.pool is not None:
            if exc[0] is not None:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
        else:
            worker.exit_inline(self._threads)
