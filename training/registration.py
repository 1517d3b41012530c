"""The end of a training: the test-split report logged to its run, registration in MLflow and the champion rule.

Training and tuning register through ``register_checkpoint``; ``aipd train`` ends in ``register_after_training``,
which keeps a trained model when MLflow is down and says how to register it later with ``aipd register``
(``register_kept_checkpoint``).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from app.config import Settings
from app.data import DatasetIndex, index_dataset, resolve_data_path
from app.errors import UserError
from app.logging import get_logger
from app.operating_point import OperatingPoint
from app.scoring import SELECTION_METRIC

log = get_logger("aipd.train")


def fit_checkpoint_operating_point(
    settings: Settings, checkpoint_dir: Path, val_records: pd.DataFrame
) -> tuple[OperatingPoint, float]:
    """Calibrate a checkpoint and set its threshold on the validation split, written into its config.json, so that
    whoever loads it (evaluation, the service, a scan) answers with that operating point. Returns it and the
    validation AUROC (which calibration does not change)."""
    from app.model import load_checkpoint, read_val_scores, set_operating_point
    from app.operating_point import fit_operating_point
    from app.scoring import auroc, score_variants

    saved = read_val_scores(checkpoint_dir)
    if saved is not None and len(saved[0]) == len(val_records):  # the training's own scores of this split
        labels, raw = saved
    else:
        loaded = load_checkpoint(checkpoint_dir)
        scores = score_variants(loaded, val_records, settings.images, {"": None})[""]
        labels, raw = scores.labels, loaded.calibration.raw(scores.logits)
    point = fit_operating_point(labels, raw, settings.train.target_fpr)
    set_operating_point(checkpoint_dir, point)
    val_auroc = auroc(labels, raw)
    return point, 0.0 if math.isnan(val_auroc) else val_auroc


def fit_checkpoint(
    settings: Settings, checkpoint_dir: Path, index: DatasetIndex, *, source_head: bool = True
) -> tuple[OperatingPoint, float]:
    """What a trained checkpoint gets before anyone loads it: its source head fitted on the training split
    (training.source_head; ``source_head=False`` keeps the trained one), its residual verdict fitted on training and
    blended on validation (training.residual_verdict, where the model has one), then its operating point on
    validation (``fit_checkpoint_operating_point``), which reads the blended verdict's validation scores."""
    from training.residual_verdict import fit_residual_verdict
    from training.source_head import refit_source_head

    if source_head:
        refit_source_head(settings, checkpoint_dir, index.split("train"))
    fit_residual_verdict(settings, checkpoint_dir, index.split("train"), index.split("val"))
    return fit_checkpoint_operating_point(settings, checkpoint_dir, index.split("val"))


def register_checkpoint(
    settings: Settings,
    checkpoint_dir: Path,
    run_id: str,
    index: DatasetIndex,
    tags: dict[str, Any],
    *,
    source_head: bool = True,
) -> tuple[Any, float, bool, str]:
    """Fit the checkpoint (``fit_checkpoint``), register it under ``run_id`` and apply the champion rule.

    Returns (registered version, val AUROC, whether champion moved, the rule's sentence); training, tuning and the
    demo share it.
    """
    point, val_auroc = fit_checkpoint(settings, checkpoint_dir, index, source_head=source_head)
    return _register_fitted(settings, checkpoint_dir, run_id, index.split("val"), point, val_auroc, tags)


def _register_fitted(
    settings: Settings,
    checkpoint_dir: Path,
    run_id: str,
    val_records: pd.DataFrame,
    point: OperatingPoint,
    val_auroc: float,
    tags: dict[str, Any],
) -> tuple[Any, float, bool, str]:
    from app.model import load_checkpoint
    from app.registry import apply_champion_rule, get_alias_version, log_detector

    loaded = load_checkpoint(checkpoint_dir)
    version = log_detector(
        settings,
        checkpoint_dir,
        run_id=run_id,
        tags={
            **point.tags(),
            "crop_size": loaded.preprocess.crop_size,
            SELECTION_METRIC: round(val_auroc, 6),
            "backbone": loaded.model_cfg.backbone,
            **tags,
        },
    )
    percent = settings.train.challenger_percent
    if percent is not None and get_alias_version(settings) is not None:
        from app.rollout import start_rollout

        rollout = start_rollout(settings, version.version, percent, started_by="aipd train --challenger")
        return version, val_auroc, False, f"version {version.version} is the challenger on {rollout.percent:g}%"
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
    """The end of a training: the checkpoint fitted (its source head on training, its residual verdict on training
    and validation, its operating point on validation), the test-split report at it logged to its run, then
    registration and the champion rule."""
    import mlflow

    point, val_auroc = fit_checkpoint(settings, checkpoint_dir, index)
    report = _evaluate_and_log(settings, checkpoint_dir, index, data_path, run_id)
    version, val_auroc, moved, message = _register_fitted(
        settings,
        checkpoint_dir,
        run_id,
        index.split("val"),
        point,
        val_auroc,
        tags={"test_auroc": round(report.metrics["auroc"], 6), "data": data_path},
    )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("best_val_auroc", val_auroc)
    mlflow.MlflowClient().set_tag(run_id, "champion", str(moved).lower())
    return Registration(run_id, version.version, val_auroc, moved, message, report)


def register_after_training(
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

    from app.checkpoint_files import is_checkpoint
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


def _evaluate_and_log(settings: Settings, checkpoint_dir: Path, index: DatasetIndex, data_path: str, run_id: str):
    """The test-split report of the trained model, written under the work directory and logged to its run."""
    import mlflow

    from app.model import load_checkpoint
    from training.evaluate import evaluate_loaded, report_metrics, write_report

    loaded = load_checkpoint(checkpoint_dir)
    report = evaluate_loaded(
        loaded,
        index.split("test"),
        settings.images,
        model_name=str(checkpoint_dir),
        data_name=data_path,
        target_fpr=settings.train.target_fpr,
    )
    report_dir = settings.work_dir.resolve() / "reports" / run_id
    write_report(report, report_dir)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(report_metrics(report, "test_"))
        mlflow.log_artifacts(str(report_dir), artifact_path="evaluation")
    return report
