"""`aipd scan`: the detector over a whole catalog, as Ray Data batch inference.

Files are listed on the driver (names only, `app.data.index_catalog`), then stream through Ray Data: CPU tasks read
each file within the byte limit, hash it, check it, decode and crop it through the one decoding path (`app.images`,
`app.transforms`); with `serve.decode_on: detector` on GPUs the tasks pass the checked bytes on and the model actors
decode them on the GPU in batches (`app.pixels`, nvJPEG: faster, but not the training's decoder). A pool of
model actors (`map_batches` with a class, `concurrency` actors, a GPU each when there are GPUs) runs the same model
runtime as the Serve detector (`serving.runtime`), so a file gets the same probability from the scan as from
`POST /predict`; `write_parquet` appends one row per file to the output. A file that cannot be
read or decoded is a row with `error` and `detail`, never a failure of the scan.

Restartable: the output is appended to, and files already in it are skipped before anything is read, so a scan that
was stopped continues where it was, and a second scan of an unchanged catalog costs a listing (`rescan` forces all).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from app.config import ImageLimits, Settings
from app.logging import get_logger
from app.scan_results import COLUMNS, output_files, read_results
from serving.config import resolve_decode_on

log = get_logger("aipd.scan")

WRITERS = 2  # Parquet-writing tasks at once
# Files per reading task: Ray Data's scheduler notices a finished task only every ~0.1 s, so a task must run for a
# second or so to keep its core busy; a small catalog gets smaller tasks, four a core at least
MIN_FILES_PER_TASK, MAX_FILES_PER_TASK = 32, 256
MAX_BLOCKS = 4000


@dataclass
class ScanPlan:
    """What a scan will do, decided on the driver before any file is read."""

    catalog: pd.DataFrame  # path, label: every file of the sources
    todo: pd.DataFrame  # the files not yet in the output
    model_uri: str  # pinned: an alias is resolved to its version now, so every actor loads the same model
    version: str
    crop_size: int
    threshold: float


@dataclass
class ScanSummary:
    files: int
    scanned: int
    skipped: int
    errors: int
    ai_generated: int
    seconds: float
    out: str
    model_version: str
    report: str | None = None
    error_kinds: dict[str, int] = field(default_factory=dict)
    # Ray Data's per-operator table for this run (wall and CPU time, rows and bytes per block, backpressure):
    # where a slow scan's time went
    operator_stats: str = ""

    @property
    def images_per_s(self) -> float:
        return self.scanned / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------------------------- planning
def plan_scan(settings: Settings, sources: list[str], out: str, model_uri: str | None, rescan: bool) -> ScanPlan:
    from app.data import index_catalog
    from app.model import load_checkpoint
    from app.model_ref import parse_model_ref
    from app.registry import resolve_model
    from serving.runtime import alias_version

    catalog = index_catalog(sources)
    ref = parse_model_ref(model_uri or settings.default_model_uri)
    if ref.kind == "alias":
        from app.registry import setup_mlflow

        setup_mlflow(settings)
        ref = ref.pinned(alias_version(ref))
    resolved = resolve_model(settings, ref.uri)
    loaded = load_checkpoint(resolved.checkpoint_dir)
    done = set() if rescan else scanned_paths(out)
    todo = catalog[~catalog["path"].isin(done)].reset_index(drop=True)
    return ScanPlan(
        catalog=catalog,
        todo=todo,
        model_uri=ref.uri,
        version=resolved.version,
        crop_size=int(loaded.preprocess.crop_size),
        threshold=float(loaded.threshold),
    )


def scanned_paths(out: str) -> set[str]:
    """The paths already in the output; a file cut short by a stopped scan is reported, and its files scanned again."""
    import pyarrow.parquet as pq

    paths: set[str] = set()
    for file_path, fs in output_files(out):
        try:
            paths.update(pq.read_table(file_path, columns=["path"], filesystem=fs).column("path").to_pylist())
        except Exception as err:  # noqa: BLE001 - a partial file from a killed writer
            log.warning("unreadable output file ignored; its files are scanned again", file=file_path, error=str(err))
    return paths


# ------------------------------------------------------------------------------------------------ the pipeline
def read_and_crop(
    batch: dict[str, np.ndarray], crop_size: int, limits: ImageLimits, decode: bool = True
) -> dict[str, np.ndarray]:
    """A CPU task's share: read, hash, validate and (``decode``) decode and crop each file, else pass its checked
    bytes on as `data` for the model actors to decode; failures become rows, not exceptions."""
    from app.images import ImageError, check_header, decode_image, read_image_bytes
    from app.transforms import eval_preprocess
    from serving.provenance import read_provenance

    n = len(batch["path"])
    crops = np.zeros((n if decode else 0, crop_size, crop_size, 3), np.uint8)
    encoded = np.full(n, None, object)
    ok = np.zeros(n, bool)
    width, height, size = (np.full(n, -1, np.int64) for _ in range(3))
    digest, error, detail, c2pa = (np.full(n, None, object) for _ in range(4))
    declared, hinted = np.zeros(n, bool), np.zeros(n, bool)
    for i, path in enumerate(batch["path"]):
        try:
            data = read_image_bytes(str(path), max_bytes=limits.max_bytes)
            size[i], digest[i] = len(data), hashlib.sha256(data).hexdigest()
            evidence = read_provenance(data, max_bytes=limits.max_bytes)
            c2pa[i], declared[i], hinted[i] = evidence.c2pa.state, evidence.ai_declared, evidence.ai_hinted_unsigned
            if decode:
                image = decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
                width[i], height[i] = image.size
                crops[i] = eval_preprocess(image, crop_size)
            else:
                header = check_header(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
                width[i], height[i] = header.upright_size
                encoded[i] = data
            ok[i] = True
        except ImageError as err:
            error[i], detail[i] = _error_code(err.reason), str(err)
        except OSError as err:
            error[i], detail[i] = "unreadable", f"{type(err).__name__}: {err}"
        except Exception as err:  # noqa: BLE001 - no decoder surprise may stop a scan of millions
            error[i], detail[i] = "corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})"
    return {
        "path": batch["path"],
        "label": batch["label"],
        **({"crop": crops} if decode else {"data": encoded}),
        "ok": ok,
        "width": width,
        "height": height,
        "bytes": size,
        "sha256": digest,
        "error": error,
        "detail": detail,
        "c2pa": c2pa,
        "ai_declared": declared,
        "ai_hinted_unsigned": hinted,
    }


def _error_code(reason: str) -> str:
    """The HTTP API's error codes for the same failures, so a scan's rows read like the service's refusals."""
    return "not_an_image" if reason == "unsupported_type" else reason


class ScanModel:
    """One model actor: the service's model runtime over batches of crops (a GPU's CUDA graphs included)."""

    def __init__(self, settings: dict[str, Any], model_uri: str, version: str, max_batch_size: int) -> None:
        from app.logging import configure_logging
        from serving.runtime import available_cores, load_active, pick_device

        parsed = Settings(**settings)
        configure_logging(parsed.log_format, parsed.log_level)
        device = pick_device(parsed.serve.use_gpu)
        if device.type == "cpu":
            import torch

            torch.set_num_threads(available_cores())  # Ray sets one thread per actor; the cores are the model's
        # One size: every batch but the last is full, and the last pads up to it (each size warmed costs seconds).
        self.active = load_active(parsed, model_uri, device, warmup_sizes=(max_batch_size,))
        self.active.version = version
        self.max_batch_size = max_batch_size
        self.limits = parsed.images

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        """The rows for a batch: pandas, so that a file that failed has nulls where it has no value."""
        from app.contract import confidence_of, verdict_of
        from serving.runtime import score_batch

        ok = np.array(batch["ok"], dtype=bool)  # a copy: files the actor cannot decode turn into error rows
        error, detail = np.array(batch["error"], dtype=object), np.array(batch["detail"], dtype=object)
        families = self.active.source_families
        scores = np.full((len(ok), 1 + len(families)), np.nan)
        rows = np.flatnonzero(ok)
        for start in range(0, len(rows), self.max_batch_size):
            chosen = rows[start : start + self.max_batch_size]
            if "data" in batch:
                chosen, crops = self._decode(batch["data"], chosen, ok, error, detail)
            else:
                crops = [batch["crop"][i] for i in chosen]
            if len(chosen):
                scores[chosen] = score_batch(self.active, crops)
        rows = np.flatnonzero(ok)  # without the files the actor could not decode
        probability = scores[:, 0]
        source, source_score = [None] * len(ok), pd.array([None] * len(ok), dtype="Float64")
        if families:
            best = np.argmax(np.nan_to_num(scores[:, 1:], nan=-1.0), axis=1)
            for i in rows:
                source[i], source_score[i] = families[best[i]], float(scores[i, 1 + best[i]])
        threshold = self.active.threshold
        answered = [
            (float(p), verdict_of(p, threshold), confidence_of(p, threshold)) if good else (None,) * 3
            for p, good in zip(probability, ok, strict=True)
        ]

        def nullable(values: np.ndarray, known: np.ndarray) -> Any:
            return pd.array([int(v) if k else None for v, k in zip(values, known, strict=True)], dtype="Int64")

        return pd.DataFrame(
            {
                "path": batch["path"],
                "prediction": [a[1] for a in answered],
                "probability": pd.array([a[0] for a in answered], dtype="Float64"),
                "confidence": [a[2] for a in answered],
                "threshold": threshold,
                "model_version": self.active.version,
                "width": nullable(batch["width"], ok),
                "height": nullable(batch["height"], ok),
                "bytes": nullable(batch["bytes"], batch["bytes"] >= 0),
                "sha256": batch["sha256"],
                "error": error,
                "detail": detail,
                "label": batch["label"],
                "source": pd.array(source, dtype="string"),
                "source_score": source_score,
                "c2pa": batch["c2pa"],
                "ai_declared": batch["ai_declared"],
                "ai_hinted_unsigned": batch["ai_hinted_unsigned"],
            }
        )[list(COLUMNS)]

    def _decode(
        self, data: np.ndarray, chosen: np.ndarray, ok: np.ndarray, error: np.ndarray, detail: np.ndarray
    ) -> tuple[np.ndarray, list]:
        """The chosen files decoded on the model's device in one batch; a file that does not decode becomes its row's
        error, as the reading task would have written it."""
        from app.pixels import decode_crops

        decoded = decode_crops([bytes(data[i]) for i in chosen], self.active.crop_size, self.active.device, self.limits)
        kept, crops = [], []
        for i, crop in zip(chosen, decoded, strict=True):
            if isinstance(crop, Exception):
                ok[i], error[i], detail[i] = False, _error_code(getattr(crop, "reason", "corrupt")), str(crop)
            else:
                kept.append(i)
                crops.append(crop)
        return np.asarray(kept, dtype=np.int64), crops


def run_scan(
    settings: Settings,
    sources: list[str],
    out: str,
    *,
    model_uri: str | None = None,
    rescan: bool = False,
    batch_size: int | None = None,
    concurrency: tuple[int, int] | None = None,
    rows_per_file: int = 4096,
    actors_per_gpu: int = 1,
    batches_per_actor: int | None = None,
    files_per_task: int | None = None,
) -> ScanSummary:
    """Scan ``sources`` into ``out`` on the connected (or a local) Ray cluster; see the module docstring.

    ``actors_per_gpu`` > 1 shares each card between model actors, so one decodes while another runs the model.
    ``batches_per_actor`` is how many batches Ray Data may queue on each model actor (its default: 2).
    ``files_per_task`` is how many files one reading task reads and decodes (default: `default_files_per_task`)."""
    import ray.data

    from app.ray_runtime import init_ray

    started = time.perf_counter()
    resources = init_ray(settings)
    plan = plan_scan(settings, sources, out, model_uri, rescan)
    skipped = len(plan.catalog) - len(plan.todo)
    log.info("scan_planned", files=len(plan.catalog), to_scan=len(plan.todo), skipped=skipped, model=plan.model_uri)
    gpus = int(resources.get("GPU", 0)) if settings.serve.use_gpu is not False else 0
    if settings.serve.use_gpu and not gpus:
        from app.errors import UserError

        raise UserError("serve.use_gpu is true but the Ray cluster has no GPU")
    batch_size = batch_size or (256 if gpus else 16)
    concurrency = concurrency or ((actors_per_gpu, actors_per_gpu * gpus) if gpus else (1, 1))
    if plan.todo.empty:
        return summarize(plan, out, skipped, 0, time.perf_counter() - started)

    actor_settings = settings.model_copy(update={"serve": settings.serve.model_copy(update={"use_gpu": gpus > 0})})
    # Blocks made here, so reading starts at once (a repartition would wait for every row), one a reading task.
    todo = plan.todo[["path", "label"]]
    per_task = files_per_task or default_files_per_task(len(todo), int(resources.get("CPU", 1)))
    blocks = [todo.iloc[start : start + per_task] for start in range(0, len(todo), per_task)]
    # The model actors ask for other resources than the reading tasks, which keeps Ray Data from fusing the two
    # steps: decoding stays on tasks spread over every core, not inside the (few) model actors.
    model_resources = {"num_gpus": 1 / actors_per_gpu} if gpus else {"num_cpus": 2}
    decode_in_tasks = resolve_decode_on(settings, gpus) == "ingress"
    _show_progress(settings.verbose)  # before the dataset exists: it takes a copy of the context
    dataset = (
        ray.data.from_pandas(blocks)
        .map_batches(
            read_and_crop,
            fn_kwargs={"crop_size": plan.crop_size, "limits": settings.images, "decode": decode_in_tasks},
            batch_size=per_task,
            batch_format="numpy",
            num_cpus=1,
        )
        .map_batches(
            ScanModel,
            fn_constructor_kwargs={
                "settings": actor_settings.model_dump(mode="json"),
                "model_uri": plan.model_uri,
                "version": plan.version,
                "max_batch_size": batch_size,
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                min_size=concurrency[0], max_size=concurrency[1], max_tasks_in_flight_per_actor=batches_per_actor
            ),
            **model_resources,
        )
    )
    # Ray Data reserves each uncapped step an equal share of the CPUs: capped, the writes (milliseconds a file)
    # leave the reading tasks the cores they would hold idle
    dataset.write_parquet(out, min_rows_per_file=min(len(plan.todo), rows_per_file), concurrency=WRITERS)
    summary = summarize(plan, out, skipped, len(plan.todo), time.perf_counter() - started)
    summary.operator_stats = dataset.stats()
    log.debug("scan_operator_stats", stats=summary.operator_stats)
    return summary


def default_files_per_task(files: int, cpus: int) -> int:
    """Long tasks for a large catalog, at least four a CPU for a small one, and never more blocks than the driver
    should hold (`MAX_BLOCKS`)."""
    spread = min(MAX_FILES_PER_TASK, max(MIN_FILES_PER_TASK, files // (4 * max(cpus, 1))))
    return max(spread, -(-files // MAX_BLOCKS))


def _show_progress(verbose: bool) -> None:
    """A scan is long: the terminal gets Ray Data's bar of the whole dataset even when quiet, its per-step table
    only with --verbose."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = True
    context.enable_operator_progress_bars = verbose
    context.use_ray_tqdm = False
    context.enable_rich_progress_bars = True


def summarize(plan: ScanPlan, out: str, skipped: int, scanned: int, seconds: float) -> ScanSummary:
    """What the output holds for this catalog now (every run of the scan), and what this run did."""
    results = read_results(out, columns=["path", "prediction", "error"])
    rows = results[results["path"].isin(set(plan.catalog["path"]))]
    failed = rows[rows["error"].notna()]
    return ScanSummary(
        files=len(plan.catalog),
        scanned=scanned,
        skipped=skipped,
        errors=len(failed),
        ai_generated=int((rows["prediction"] == "ai_generated").sum()),
        seconds=seconds,
        out=out,
        model_version=plan.version,
        error_kinds={str(k): int(v) for k, v in failed["error"].value_counts().items()},
    )
