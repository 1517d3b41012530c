"""The driver side of training: build the Ray Data pipelines and the TorchTrainer, run it, then evaluate,
register and apply the champion rule.

``build_trainer`` is shared with tuning (each Tune trial builds and fits one); ``run_training`` is what
``aipd train`` calls, and ``register_kept_checkpoint`` what ``aipd register`` calls when MLflow was down as a training
ended: both finish through ``evaluate_and_register``.
"""

from __future__ import annotations

import math
import platform
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from app.config import Settings
from app.data import DatasetIndex, DecodeOptions, index_dataset, to_ray_dataset
from app.errors import UserError
from app.logging import get_logger
from training.loop import LoopConfig, epoch_checkpoint_name, train_loop_per_worker
from training.progress import EpochWatcher, OnEpoch

log = get_logger("aipd.train")


def resolve_data_path(settings: Settings) -> str:
    """The dataset to use: ``--data`` / settings, else the demo set (built on first use)."""
    if settings.data.path:
        return settings.data.path
    demo_dir = settings.demo_data_dir
    if not (demo_dir / "summary.json").is_file():
        from app.demo import build_demo_dataset

        log.info("building_demo_dataset", out=str(demo_dir))
        build_demo_dataset(
            demo_dir,
            images_per_class=settings.data.demo_images_per_class,
            size=settings.data.demo_size,
            seed=settings.data.demo_seed,
        )
    return str(demo_dir)


def decode_options(
    settings: Settings, *, train: bool, crop_size: int, augment_prob: float | None = None
) -> DecodeOptions:
    from app.transforms import AugmentConfig

    aug = settings.train.augment
    blur_prob = aug.blur_prob if augment_prob is None else augment_prob
    jpeg_prob = aug.jpeg_prob if augment_prob is None else augment_prob
    return DecodeOptions(
        crop_size=crop_size,
        train=train,
        limits=settings.images,
        augment=AugmentConfig(
            blur_prob=blur_prob,
            blur_sigma=(0.1, aug.blur_sigma_max),
            jpeg_prob=jpeg_prob,
            jpeg_quality=(aug.jpeg_quality_min, 95),
        )
        if train
        else None,
        log_format=settings.log_format,
        seed=settings.train.seed if train else None,
    )


def build_trainer(
    settings: Settings,
    index: DatasetIndex,
    *,
    use_gpu: bool,
    name: str,
    mlflow_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
):
    """A TorchTrainer over the index's train and val splits; ``overrides`` are hyperparameters (tuning)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = settings.train
    hp = {
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "batch_size": t.batch_size,
        "crop_size": t.crop_size,
        "dropout": settings.model.dropout,
        "augment_prob": None,
        "epochs": t.epochs,
    }
    hp.update({k: v for k, v in (overrides or {}).items() if v is not None})
    train_records, val_records = index.split("train"), index.split("val")
    workers = t.num_workers
    steps_per_epoch = max(1, len(train_records) // (hp["batch_size"] * workers))
    model_cfg = settings.model.model_dump()
    model_cfg["dropout"] = hp["dropout"]
    loop = LoopConfig(
        model=model_cfg,
        crop_size=hp["crop_size"],
        batch_size=hp["batch_size"],
        epochs=hp["epochs"],
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        warmup_epochs=t.warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        target_fpr=t.target_fpr,
        seed=t.seed,
        log_format=settings.log_format,
        mlflow_tracking_uri=settings.tracking_uri if mlflow_run_id else None,
        mlflow_run_id=mlflow_run_id,
    )
    train_options = decode_options(settings, train=True, crop_size=hp["crop_size"], augment_prob=hp["augment_prob"])
    val_options = decode_options(settings, train=False, crop_size=hp["crop_size"])
    datasets = {  # paths stay behind: workers only need pixels and labels as tensors
        "train": to_ray_dataset(train_records, train_options).drop_columns(["path"]),
        "val": to_ray_dataset(val_records, val_options).drop_columns(["path"]),
    }
    resources = {"CPU": t.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(settings.ray_storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="val_auroc", checkpoint_score_order="max"
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=_ordered_train_data(),
    )


def _ordered_train_data() -> Any:
    """Train's data in the order its seeded shuffle made (Ray Data otherwise hands blocks over as they finish),
    so one worker sees the same sequence in every rerun."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options={"train": options})


def best_checkpoint_dir(result: Any, out_dir: Path) -> Path:
    """Copy the best checkpoint's model files (not the optimizer state) out of Ray's storage."""
    from app.model import copy_checkpoint

    best = result.get_best_checkpoint(metric="val_auroc", mode="max") if result.best_checkpoints else result.checkpoint
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    with best.as_directory() as src:
        return copy_checkpoint(src, out_dir)


def register_checkpoint(
    settings: Settings, checkpoint_dir: Path, run_id: str, val_records: pd.DataFrame, tags: dict[str, Any]
) -> tuple[Any, float, bool, str]:
    """Score a checkpoint on validation, register it under ``run_id`` and apply the champion rule.

    Returns (registered version, val AUROC, whether champion moved, the rule's sentence); training and tuning share it.
    """
    from app.model import load_checkpoint
    from app.registry import apply_champion_rule, log_detector
    from app.scoring import validation_auroc

    loaded = load_checkpoint(checkpoint_dir)
    val_auroc = validation_auroc(loaded, val_records, settings.images)
    version = log_detector(
        settings,
        checkpoint_dir,
        run_id=run_id,
        tags={
            "threshold": loaded.threshold,
            "crop_size": loaded.preprocess.crop_size,
            "val_auroc": round(val_auroc, 6),
            "target_fpr": settings.train.target_fpr,
            "backbone": loaded.model_cfg.backbone,
            **tags,
        },
    )
    moved, message = apply_champion_rule(settings, version.version, val_auroc, val_records)
    return version, val_auroc, moved, message


class RegistrationPendingError(UserError, RuntimeError):
    """Training finished but MLflow could not take its model; the message says where the checkpoint is kept and the
    command that registers it."""


@dataclass
class Registration:
    """What registering a trained checkpoint decided: its version, its val AUROC and the champion rule's verdict."""

    run_id: str
    version: str
    val_auroc: float
    champion_moved: bool
    champion_message: str
    report: Any


def evaluate_and_register(
    settings: Settings, checkpoint_dir: Path, index: DatasetIndex, data_path: str, run_id: str
) -> Registration:
    """The end of a training: the test-split report logged to its run, then registration and the champion rule."""
    import mlflow

    report = _evaluate_and_log(settings, checkpoint_dir, index, data_path, run_id)
    version, val_auroc, moved, message = register_checkpoint(
        settings,
        checkpoint_dir,
        run_id,
        index.split("val"),
        tags={"test_auroc": round(report.metrics["auroc"], 6), "data": data_path},
    )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("best_val_auroc", val_auroc)
    mlflow.MlflowClient().set_tag(run_id, "champion", str(moved).lower())
    return Registration(run_id, version.version, val_auroc, moved, message, report)


def _register_after_training(
    settings: Settings, checkpoint_dir: Path, index: DatasetIndex, data_path: str, run_id: str
) -> Registration:
    """``evaluate_and_register``, or, when MLflow fails (it went down while Ray trained), one line that says where the
    trained model is kept and how to register it later: a training run is too dear to lose to the tracking server."""
    from mlflow.exceptions import MlflowException

    from app.registry import RegistryError, setup_mlflow

    try:
        setup_mlflow(settings)  # fails in seconds when the server is down, before MLflow's minutes of retries
        return evaluate_and_register(settings, checkpoint_dir, index, data_path, run_id)
    except (RegistryError, MlflowException) as err:
        command = f"aipd register {shlex.quote(str(checkpoint_dir))} --data {shlex.quote(data_path)} --run-id {run_id}"
        raise RegistrationPendingError(
            f"training finished but the model could not be registered ({str(err).strip().splitlines()[0]}); "
            f"the trained model is kept in {checkpoint_dir} - once MLflow is reachable, register it with: {command}"
        ) from err


def register_kept_checkpoint(settings: Settings, checkpoint_dir: Path, run_id: str | None = None) -> Registration:
    """``aipd register``: evaluate, register and judge a checkpoint that training kept, under its training run
    (``run_id``, which is then marked finished) or a new run of its own."""
    import mlflow

    from app.model import is_checkpoint
    from app.ray_runtime import init_ray
    from app.registry import RegistryError, setup_mlflow

    if not is_checkpoint(checkpoint_dir):
        raise RegistryError(f"{checkpoint_dir} is not a checkpoint directory (no model.pt and config.json there)")
    checkpoint_dir = checkpoint_dir.resolve()
    data_path = resolve_data_path(settings)
    index = index_dataset(data_path)
    index.require_splits("val", "test")
    init_ray(settings)
    experiment_id = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=f"register-{checkpoint_dir.name}").info.run_id
    else:
        _require_run(client, run_id)
    registration = evaluate_and_register(settings, checkpoint_dir, index, data_path, run_id)
    client.set_terminated(run_id, status="FINISHED")
    log.info("checkpoint_registered", run_id=run_id, version=registration.version, champion=registration.champion_moved)
    return registration


def _require_run(client: Any, run_id: str) -> None:
    from mlflow.exceptions import MlflowException

    from app.registry import RegistryError

    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise RegistryError(f"MLflow has no run {run_id}: {str(err).strip().splitlines()[0]}") from err


@dataclass
class TrainOutcome:
    run_id: str
    version: str
    champion_moved: bool
    champion_message: str
    checkpoint_dir: Path
    val_auroc: float
    report: Any
    wall_s: float
    epochs_run: int


def run_training(settings: Settings, on_epoch: OnEpoch | None = None) -> TrainOutcome:
    """``aipd train``: fit, evaluate on the test split, register, and move ``champion`` only if it wins.

    ``on_epoch`` hears of every finished epoch while Ray trains (a progress bar; the demo serves an early one).
    """
    import mlflow

    from app.ray_runtime import cluster_has_gpus, init_ray
    from app.registry import registry_unreachable, setup_mlflow

    started = time.perf_counter()
    data_path = resolve_data_path(settings)
    index = index_dataset(data_path)
    index.require_splits("train", "val", "test")
    init_ray(settings)
    use_gpu = settings.train.use_gpu if settings.train.use_gpu is not None else cluster_has_gpus()
    experiment_id = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = _start_run(client, experiment_id, name, settings, data_path, use_gpu, index.counts())
    log.info("training_started", run_id=run_id, data=data_path, use_gpu=use_gpu, workers=settings.train.num_workers)

    ray_name = f"{name}-{run_id[:8]}"
    trainer = build_trainer(settings, index, use_gpu=use_gpu, name=ray_name, mlflow_run_id=run_id)
    watcher = None
    if on_epoch is not None:
        watcher = EpochWatcher(
            client,
            run_id,
            settings.train.epochs,
            lambda epoch: settings.ray_storage / ray_name / epoch_checkpoint_name(epoch),
            on_epoch,
            unreachable=lambda: registry_unreachable(settings, timeout_s=2.0),
        )
        watcher.start()
    try:
        result = fit_keeping_sigint_handler(trainer)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        if watcher is not None:
            watcher.stop()
    checkpoint_dir = best_checkpoint_dir(result, settings.work_dir.resolve() / "checkpoints" / run_id)
    epochs_run = int(result.metrics["epoch"]) + 1 if result.metrics else 0

    registration = _register_after_training(settings, checkpoint_dir, index, data_path, run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("epochs_run", epochs_run)
    log.info("training_finished", run_id=run_id, version=registration.version, champion=registration.champion_moved)
    return TrainOutcome(
        run_id,
        registration.version,
        registration.champion_moved,
        registration.champion_message,
        checkpoint_dir,
        registration.val_auroc,
        registration.report,
        time.perf_counter() - started,
        epochs_run,
    )


def _start_run(
    client: Any,
    experiment_id: str,
    name: str,
    settings: Settings,
    data_path: str,
    use_gpu: bool,
    counts: dict[str, dict[str, int]],
) -> str:
    """A run that stays RUNNING while Ray trains (rank 0 logs its epochs into it) and ends FINISHED or FAILED."""
    from mlflow.entities import Param, RunTag

    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    params = _flat({"train": settings.train.model_dump(), "model": settings.model.model_dump()})
    params.update(
        {
            "data": data_path,
            "use_gpu": use_gpu,
            **{f"n_{split}_{cls}": n for split, c in counts.items() for cls, n in c.items()},
        }
    )
    client.log_batch(
        run_id,
        params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in _system_tags().items()],
    )
    return run_id


def _evaluate_and_log(settings: Settings, checkpoint_dir: Path, index: DatasetIndex, data_path: str, run_id: str):
    """The test-split report of the trained model, written under the work directory and logged to its run."""
    import mlflow

    from app.model import load_checkpoint
    from training.evaluate import evaluate_loaded, write_report

    loaded = load_checkpoint(checkpoint_dir)
    report = evaluate_loaded(
        loaded, index.split("test"), settings.images, model_name=str(checkpoint_dir), data_name=data_path
    )
    report_dir = settings.work_dir.resolve() / "reports" / run_id
    write_report(report, report_dir)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            {
                f"test_{k}": v
                for k, v in report.to_json().items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
        )
        mlflow.log_metrics({f"test_robust_{k}": v for k, v in report.robustness.items() if not math.isnan(v)})
        mlflow.log_artifacts(str(report_dir), artifact_path="evaluation")
    return report


def fit_keeping_sigint_handler(trainer: Any) -> Any:
    """``trainer.fit()``, then the caller's Ctrl-C handler back in place.

    Ray Train installs its own SIGINT handler for the run and leaves it installed afterwards, so a later Ctrl-C
    would only log "aborting the training run" - `aipd demo`, which keeps serving after training, could not be stopped.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _system_tags() -> dict[str, str]:
    import ray
    import timm
    import torch

    tags = {
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "host": platform.node(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    return tags
