"""``aipd tune``: a Ray Tune experiment whose every trial is one Ray Train run, tracked in MLflow.

With Ray Train v2 a Tuner cannot take a TorchTrainer: each trial runs ``run_trial``, a small driver function that
builds the trainer with the trial's hyperparameters and fits it. ``TuneReportCallback`` forwards every Train report
to Tune, so ASHA sees validation AUROC per epoch and stops weak trials early.

MLflow holds one parent run per experiment and one nested child run per trial (created by the trial's driver and
handed to rank 0, which logs per-epoch metrics into it). The best trial's model is registered and the champion alias
moves only if it beats the current champion on the same validation data.

An experiment lives in ``<ray_results>/tune-<name>``; ``tune-<name>.aipd.json`` beside it keeps the parent run id and
the settings it started with, so ``aipd tune --resume`` continues it with ``Tuner.restore``: finished trials stay
finished, and an interrupted trial's Train run (same storage path and name) restarts from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from app.config import Settings
from app.logging import get_logger
from tuning.search_space import (
    METRIC,
    MODE,
    SEARCH_KEYS,
    TIME_ATTR,
    build_scheduler,
    build_search_alg,
    build_search_space,
    expected_trials,
    resolve_search_alg,
)

log = get_logger("aipd.tune")

STATE_SUFFIX = ".aipd.json"
TRIAL_TAG = "aipd.tune_trial_id"
PARENT_TAG = "mlflow.parentRunId"
# The trial function only launches and watches a Train run (the workers hold the real resources), so it asks
# for a sliver of a CPU: trials are paced by max_concurrent and by the workers' resources, not by their drivers.
TRIAL_DRIVER_CPUS = 0.25
# Secrets stay out of the state file; a resume takes these sections from its own settings.
PRIVATE_SETTINGS = {"api_keys", "ui"}


class TuningError(RuntimeError):
    """A tuning run that cannot start or finish as asked; the message says what to do."""


class TuningInterrupted(TuningError):
    """The experiment stopped before every trial finished; its state is saved and ``--resume`` continues it."""


@dataclass
class TrialSummary:
    trial_id: str
    params: dict[str, Any]
    best_val_auroc: float | None
    epochs_run: int
    epochs: int
    status: str  # "finished" | "stopped early" | "error"
    run_id: str | None = None
    error: str | None = None
    checkpoint_path: str | None = None

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


@dataclass
class TuneOutcome:
    name: str
    experiment_path: Path
    experiment_id: str
    parent_run_id: str
    search_alg: str
    trials: list[TrialSummary]
    best: TrialSummary
    version: str
    champion_moved: bool
    champion_message: str
    checkpoint_dir: Path
    val_auroc: float
    fit_wall_s: float
    wall_s: float
    mlflow_link: str
    resumed: bool


@dataclass
class ExperimentState:
    """What a resume needs and Tune does not keep: the MLflow parent run and the settings the trials were built with."""

    name: str
    parent_run_id: str
    experiment_id: str
    expected_trials: int
    search_alg: str
    settings: dict[str, Any]
    finished: bool = False
    version: str | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    def save(self, storage: Path) -> None:
        storage.mkdir(parents=True, exist_ok=True)
        state_path(storage, self.name).write_text(json.dumps(asdict(self), indent=2))


def experiment_dir(storage: Path, name: str) -> Path:
    return storage / f"tune-{name}"


def state_path(storage: Path, name: str) -> Path:
    return storage / f"tune-{name}{STATE_SUFFIX}"


def load_state(storage: Path, name: str | None) -> ExperimentState:
    """The named experiment's state, or the most recent one's when no name is given."""
    if name:
        path = state_path(storage, name)
        if not path.is_file():
            raise TuningError(f"no tuning experiment named {name!r} under {storage} (nothing to resume)")
    else:
        found = sorted(storage.glob(f"tune-*{STATE_SUFFIX}"), key=lambda p: p.stat().st_mtime) if storage.is_dir() else []
        if not found:
            raise TuningError(f"no tuning experiment under {storage} to resume; start one with `aipd tune`")
        path = found[-1]
    return ExperimentState(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------- the trial
class EpochReportCallback(TuneReportCallback):
    """Adds ``epochs_done`` (1-based) to each report: ASHA counts epochs even when a resumed trial's Train run
    restarts from a checkpoint mid-way (Tune's own iteration counter would start again at 1)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = {**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(
    config: dict[str, Any], *, settings: Settings, index: Any, use_gpu: bool, parent_run_id: str, experiment_id: str,
) -> None:
    """One trial: open (or, on resume, reopen) its MLflow child run, then build and fit its Train run."""
    import ray.tune
    from mlflow import MlflowClient

    from app.logging import configure_logging
    from training.trainer import build_trainer

    configure_logging(settings.log_format, settings.log_level)
    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run_id = child_run(client, experiment_id, parent_run_id, trial_id, config, settings.tune.epochs)
    trainer = build_trainer(
        settings, index, use_gpu=use_gpu, name=f"tune-{settings.tune.name}-{trial_id}",
        mlflow_run_id=run_id, overrides={**config, "epochs": settings.tune.epochs}, callbacks=[EpochReportCallback()],
    )
    if use_gpu and settings.tune.gpus_per_trial != 1:
        trainer = with_worker_gpus(trainer, settings.tune.gpus_per_trial)
    try:
        trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def child_run(
    client: Any, experiment_id: str, parent_run_id: str, trial_id: str, config: dict[str, Any], epochs: int
) -> str:
    """The trial's nested run; a restarted trial (after ``--resume``) finds and reuses the one it had."""
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        return run_id
    run = client.create_run(
        experiment_id, run_name=f"trial_{trial_id}", tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id},
    )
    client.log_batch(run.info.run_id, params=_params({**config, "epochs": epochs}))
    return run.info.run_id


def with_worker_gpus(trainer: Any, gpus: float) -> Any:
    """The same trainer with ``gpus`` (a fraction packs several trials onto one card) per worker.

    ``build_trainer`` gives each GPU worker a whole GPU; the trainer is rebuilt from its own parts with only the
    scaling config changed.
    """
    from dataclasses import replace

    from ray.train.torch import TorchTrainer

    scaling = trainer.scaling_config
    resources = {**(scaling.resources_per_worker or {}), "GPU": gpus}
    return TorchTrainer(
        trainer.train_loop_per_worker, train_loop_config=trainer.train_loop_config,
        scaling_config=replace(scaling, resources_per_worker=resources), run_config=trainer.run_config,
        datasets=trainer.datasets,
    )


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


# ---------------------------------------------------------------------------------------------------- the driver
def run_tuning(settings: Settings, resume: bool = False, *, search_space: dict[str, Any] | None = None) -> TuneOutcome:
    """Run (or with ``resume`` continue) a tuning experiment, register its best model and apply the champion rule.

    ``search_space`` replaces the one built from ``settings.tune`` (tests and benchmarks use fixed grids); a resumed
    experiment always keeps the space it started with.
    """
    import ray.tune
    from mlflow import MlflowClient

    from app.data import DatasetError, index_dataset
    from app.ray_runtime import cluster_has_gpus, init_ray
    from app.registry import setup_mlflow

    started = time.perf_counter()
    storage = settings.ray_storage
    state = load_state(storage, settings.tune.name) if resume else None
    settings = _resumed_settings(state, settings) if state else _fresh_settings(settings)
    name = settings.tune.name
    assert name is not None
    path = experiment_dir(storage, name)
    if state and state.finished:
        raise TuningError(f"experiment {name!r} already finished (registered version {state.version}); "
                          "start a new one with `aipd tune`")

    index = index_dataset(settings.data.path)
    counts = index.counts()
    for split in ("train", "val"):
        if sum(counts[split].values()) == 0:
            raise DatasetError(f"the {split} split of {settings.data.path} is empty")
    init_ray(settings)
    use_gpu = settings.tune.gpus_per_trial > 0 and (
        settings.train.use_gpu if settings.train.use_gpu is not None else cluster_has_gpus())
    experiment_id = setup_mlflow(settings)
    client = MlflowClient()
    space = search_space or build_search_space(settings.tune)
    if state is None:
        search_alg = resolve_search_alg(settings.tune.search_alg, space)
        state = ExperimentState(
            name=name, parent_run_id=_parent_run(client, experiment_id, settings, space, search_alg, use_gpu),
            experiment_id=experiment_id, expected_trials=expected_trials(space, settings.tune.num_samples),
            search_alg=search_alg,
            settings=settings.model_dump(mode="json", exclude={k for k in PRIVATE_SETTINGS if hasattr(settings, k)}),
        )
        state.save(storage)
    else:
        client.update_run(state.parent_run_id, status="RUNNING")
    log.info("tuning_started", experiment=str(path), parent_run_id=state.parent_run_id, resume=resume,
             search_alg=state.search_alg, trials=state.expected_trials, use_gpu=use_gpu)

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, settings=settings, index=index, use_gpu=use_gpu, parent_run_id=state.parent_run_id,
            experiment_id=state.experiment_id,
        ),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    if resume and ray.tune.Tuner.can_restore(str(path)):
        tuner = ray.tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:  # a new experiment, or one interrupted before Tune saved anything: nothing finished, start it afresh
        tuner = ray.tune.Tuner(
            trainable,
            param_space=space,
            tune_config=ray.tune.TuneConfig(
                metric=METRIC, mode=MODE,
                search_alg=build_search_alg(state.search_alg, settings.train.seed, settings.tune.max_concurrent),
                scheduler=build_scheduler(settings.tune), num_samples=settings.tune.num_samples,
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_name,
            ),
            run_config=ray.tune.RunConfig(name=path.name, storage_path=str(storage)),
        )
    fit_started = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        _mark_killed(client, state)
        raise
    fit_wall_s = time.perf_counter() - fit_started

    done = sum(1 for result in grid if _ended(result))
    if len(grid) < state.expected_trials or done < len(grid):
        _mark_killed(client, state)
        raise TuningInterrupted(f"experiment {name!r} interrupted after {done} of {state.expected_trials} trials; "
                                f"continue it with `aipd tune --resume --name {name}`")
    trials = summarize(grid, settings.tune.epochs, _trial_runs(client, state))
    _close_trial_runs(client, state, trials)
    scored = [t for t in trials if t.best_val_auroc is not None and t.checkpoint_path]
    if not scored:
        client.set_terminated(state.parent_run_id, status="FAILED")
        first_error = next((t.error for t in trials if t.error), "no trial reported a checkpoint")
        raise TuningError(f"every trial of {name!r} failed: {first_error}")
    best = max(scored, key=lambda t: t.best_val_auroc or 0.0)
    checkpoint_dir, val_auroc, version, moved, message = _register_best(settings, index, best, state)

    client.log_batch(state.parent_run_id, params=_params({f"best.{k}": v for k, v in best.params.items()}))
    client.log_metric(state.parent_run_id, "best_val_auroc", float(best.best_val_auroc or 0.0))
    client.log_metric(state.parent_run_id, "registered_val_auroc", val_auroc)
    client.log_metric(state.parent_run_id, "trials", len(trials))
    client.log_metric(state.parent_run_id, "trials_stopped_early", sum(t.stopped_early for t in trials))
    for key, value in {"best_trial": best.trial_id, "best_run_id": best.run_id or "", "registered_version": version,
                       "champion": str(moved).lower()}.items():
        client.set_tag(state.parent_run_id, key, value)
    client.set_terminated(state.parent_run_id, status="FINISHED")
    state.finished, state.version = True, version
    state.save(storage)
    log.info("tuning_finished", experiment=name, best_trial=best.trial_id, val_auroc=round(val_auroc, 4),
             version=version, champion=moved)
    return TuneOutcome(
        name=name, experiment_path=path, experiment_id=state.experiment_id, parent_run_id=state.parent_run_id,
        search_alg=state.search_alg, trials=trials, best=best, version=version, champion_moved=moved,
        champion_message=message, checkpoint_dir=checkpoint_dir, val_auroc=val_auroc, fit_wall_s=fit_wall_s,
        wall_s=time.perf_counter() - started,
        mlflow_link=mlflow_link(settings, state.experiment_id, state.parent_run_id), resumed=resume,
    )


def _fresh_settings(settings: Settings) -> Settings:
    """Settings the trials can use from any working directory (Tune runs each trial in its own folder)."""
    from training.trainer import resolve_data_path

    name = settings.tune.name or time.strftime("%Y%m%d-%H%M%S")
    storage = settings.ray_storage
    if experiment_dir(storage, name).exists() or state_path(storage, name).exists():
        raise TuningError(f"a tuning experiment named {name!r} already exists under {storage}; continue it with "
                          f"`aipd tune --resume --name {name}` or choose another --name")
    settings = settings.model_copy(update={"work_dir": settings.work_dir.resolve()})
    data_path = resolve_data_path(settings)
    if "://" not in data_path:
        data_path = str(Path(data_path).resolve())
    return settings.model_copy(update={
        "data": settings.data.model_copy(update={"path": data_path}),
        "tune": settings.tune.model_copy(update={"name": name}),
        "train": settings.train.model_copy(update={"cpus_per_worker": settings.tune.cpus_per_trial}),
    })


def _resumed_settings(state: ExperimentState, current: Settings) -> Settings:
    """The settings the experiment started with; only where Ray runs and how logs look come from this call."""
    saved = Settings(**state.settings)
    update = {"ray_address": current.ray_address, "log_format": current.log_format, "log_level": current.log_level}
    update.update({k: getattr(current, k) for k in PRIVATE_SETTINGS if hasattr(current, k)})
    return saved.model_copy(update=update)


def _parent_run(client: Any, experiment_id: str, settings: Settings, space: dict[str, Any], search_alg: str,
                use_gpu: bool) -> str:
    run = client.create_run(experiment_id, run_name=f"tune-{settings.tune.name}",
                            tags={"aipd.stage": "tune", "aipd.tune_experiment": str(settings.tune.name)})
    params = {f"tune.{k}": v for k, v in settings.tune.model_dump().items() if k not in SEARCH_KEYS}
    params.update({f"space.{k}": _describe(v) for k, v in space.items()})
    params.update({"search_alg_used": search_alg, "data": settings.data.path, "use_gpu": use_gpu,
                   "train.num_workers": settings.train.num_workers, "model.backbone": settings.model.backbone})
    client.log_batch(run.info.run_id, params=_params(params))
    return run.info.run_id


def _ended(result: Any) -> bool:
    """Finished, stopped by the scheduler, or failed. After Ctrl-C Tune reports the trials it cut short as terminated
    too; only a real end marks the last result ``done``."""
    return result.error is not None or bool((result.metrics or {}).get("done"))


def summarize(grid: Any, epochs: int, runs: dict[str, str]) -> list[TrialSummary]:
    """One row per trial from Tune's results: best validation AUROC, epochs run, and how it ended."""
    trials = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        frame = result.metrics_dataframe
        best_auroc, epochs_run, checkpoint = None, 0, None
        if frame is not None and METRIC in frame and frame[METRIC].notna().any():
            best_auroc = float(frame[METRIC].max())
            epochs_run = int(frame[TIME_ATTR].max()) if TIME_ATTR in frame else len(frame)
            checkpoint = _best_checkpoint(frame)
        if result.error is not None:
            status = "error"
        else:
            status = "finished" if epochs_run >= epochs else "stopped early"
        config = result.config or {}
        params = {k: config[k] for k in SEARCH_KEYS if k in config}
        trials.append(TrialSummary(
            trial_id=trial_id, params=params, best_val_auroc=best_auroc, epochs_run=epochs_run, epochs=epochs,
            status=status, run_id=runs.get(trial_id), error=_first_line(result.error), checkpoint_path=checkpoint,
        ))
    return trials


def _best_checkpoint(frame: Any) -> str | None:
    """The checkpoint of the best epoch that Train kept (it keeps the top ones by val AUROC)."""
    if "checkpoint_path" not in frame:
        return None
    for _, row in frame.sort_values(METRIC, ascending=False).iterrows():
        path = row["checkpoint_path"]
        if isinstance(path, str) and (Path(path) / "model.pt").is_file():
            return path
    return None


def _trial_runs(client: Any, state: ExperimentState) -> dict[str, str]:
    runs = client.search_runs([state.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{state.parent_run_id}'")
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _close_trial_runs(client: Any, state: ExperimentState, trials: list[TrialSummary]) -> None:
    """Trials ASHA stopped were killed mid-run and could not close their own MLflow runs; the driver does."""
    for trial in trials:
        if trial.run_id is None:
            continue
        client.set_tag(trial.run_id, "tune_status", trial.status)
        client.set_tag(trial.run_id, "stopped_early", str(trial.stopped_early).lower())
        client.log_metric(trial.run_id, "epochs_run", trial.epochs_run)
        if trial.best_val_auroc is not None:
            client.log_metric(trial.run_id, "best_val_auroc", trial.best_val_auroc)
        client.set_terminated(trial.run_id, status="FAILED" if trial.status == "error" else "FINISHED")
    for run in client.search_runs([state.experiment_id], filter_string=(
            f"tags.`{PARENT_TAG}` = '{state.parent_run_id}' and attributes.status = 'RUNNING'")):
        client.set_terminated(run.info.run_id, status="FAILED")


def _mark_killed(client: Any, state: ExperimentState) -> None:
    """An interrupted experiment shows as KILLED in MLflow until ``--resume`` reopens its runs."""
    for run in client.search_runs([state.experiment_id], filter_string=(
            f"tags.`{PARENT_TAG}` = '{state.parent_run_id}' and attributes.status = 'RUNNING'")):
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(state.parent_run_id, status="KILLED")


def _register_best(settings: Settings, index: Any, best: TrialSummary, state: ExperimentState):
    """Register the best trial's best checkpoint under its child run; the champion rule decides the alias."""
    from app.model import load_checkpoint
    from app.registry import log_detector
    from training.trainer import validation_auroc, apply_champion_rule

    assert best.checkpoint_path is not None and best.run_id is not None
    checkpoint_dir = settings.work_dir / "checkpoints" / best.run_id
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for file_name in ("model.pt", "config.json"):
        shutil.copy2(Path(best.checkpoint_path) / file_name, checkpoint_dir / file_name)
    loaded = load_checkpoint(checkpoint_dir)
    limits = {"max_bytes": settings.images.max_bytes, "max_pixels": settings.images.max_pixels}
    val_records = index.split("val")
    val_auroc = validation_auroc(loaded, val_records, limits)
    version = log_detector(settings, checkpoint_dir, run_id=best.run_id, tags={
        "threshold": loaded.threshold, "crop_size": loaded.preprocess.crop_size, "val_auroc": round(val_auroc, 6),
        "target_fpr": settings.train.target_fpr, "data": settings.data.path, "backbone": loaded.model_cfg.backbone,
        "tune_experiment": state.name, "tune_trial": best.trial_id,
    })
    moved, message = apply_champion_rule(settings, version.version, val_auroc, val_records, limits)
    return checkpoint_dir, val_auroc, version.version, moved, message


def mlflow_link(settings: Settings, experiment_id: str, run_id: str) -> str:
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}"
    uri = settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{fragment}"
    return f"http://127.0.0.1:5000/{fragment}  (after `mlflow ui --backend-store-uri {uri}`)"


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def _describe(value: Any) -> str:
    """A search-space entry as a short string for MLflow (``Domain`` objects print their bounds)."""
    if isinstance(value, dict) and "grid_search" in value:
        return f"grid{value['grid_search']}"
    categories = getattr(value, "categories", None)
    if categories is not None:
        return f"choice{list(categories)}"
    lower, upper = getattr(value, "lower", None), getattr(value, "upper", None)
    if lower is not None and upper is not None:
        return f"loguniform({lower}, {upper})"
    return str(value)


def _first_line(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    return str(value)
