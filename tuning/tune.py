"""``aipd tune``: a Ray Tune experiment whose every trial is one Ray Train run, tracked in MLflow.

With Ray Train v2 a Tuner cannot take a TorchTrainer: each trial runs ``run_trial``, a small driver function that
builds the trainer with the trial's hyperparameters and fits it. ``TuneReportCallback`` forwards every Train report
to Tune, so ASHA sees validation AUROC per epoch and stops weak trials early. The best trial's model is registered and
the champion alias moves only if it beats the current champion on the same validation data.

``aipd tune --resume`` continues an experiment with ``Tuner.restore`` (tuning/experiment.py keeps what Tune does not):
finished trials stay finished, and an interrupted trial's Train run (same storage path and name) restarts from its
last checkpoint. The MLflow parent and child runs are kept by tuning/tracking.py.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from app.config import Settings
from app.logging import get_logger
from app.scoring import SELECTION_METRIC, SELECTION_MODE
from tuning import tracking
from tuning.experiment import (
    ExperimentState,
    TuningError,
    TuningInterrupted,
    experiment_dir,
    fresh_settings,
    load_state,
    resumed_settings,
    saved_settings,
)
from tuning.search_space import (
    SEARCH_KEYS,
    TIME_ATTR,
    build_scheduler,
    build_search_alg,
    build_search_space,
    expected_trials,
    resolve_search_alg,
)

__all__ = ["TuningError", "TuningInterrupted", "run_tuning", "with_worker_gpus"]

log = get_logger("aipd.tune")

# The trial function only launches and watches a Train run (the workers hold the real resources), so it asks
# for a sliver of a CPU: trials are paced by max_concurrent and by the workers' resources, not by their drivers.
TRIAL_DRIVER_CPUS = 0.25


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


# ----------------------------------------------------------------------------------------------------- the trial
class EpochReportCallback(TuneReportCallback):
    """Adds ``epochs_done`` (1-based) to each report: ASHA counts epochs even when a resumed trial's Train run
    restarts from a checkpoint mid-way (Tune's own iteration counter would start again at 1)."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = {**metrics[0], TIME_ATTR: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(
    config: dict[str, Any],
    *,
    settings: Settings,
    index: Any,
    use_gpu: bool,
    parent_run_id: str,
    experiment_id: str,
) -> None:
    """One trial: open (or, on resume, reopen) its MLflow child run, then build and fit its Train run."""
    import ray.tune
    from mlflow import MlflowClient

    from app.logging import configure_logging
    from training.trainer import build_trainer

    configure_logging(settings.log_format, settings.log_level)
    trial_id = ray.tune.get_context().get_trial_id()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run_id = tracking.child_run(client, experiment_id, parent_run_id, trial_id, config, settings.tune.epochs)
    trainer = build_trainer(
        settings,
        index,
        use_gpu=use_gpu,
        name=f"tune-{settings.tune.name}-{trial_id}",
        mlflow_run_id=run_id,
        overrides={**config, "epochs": settings.tune.epochs},
        callbacks=[EpochReportCallback()],
    )
    if use_gpu and settings.tune.gpus_per_trial != 1:
        trainer = with_worker_gpus(trainer, settings.tune.gpus_per_trial)
    try:
        trainer.fit()
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


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
        trainer.train_loop_per_worker,
        train_loop_config=trainer.train_loop_config,
        scaling_config=replace(scaling, resources_per_worker=resources),
        run_config=trainer.run_config,
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
    from mlflow import MlflowClient

    from app.data import index_dataset
    from app.ray_runtime import cluster_has_gpus, init_ray
    from app.registry import run_link, setup_mlflow

    started = time.perf_counter()
    storage = settings.ray_storage
    state = load_state(storage, settings.tune.name) if resume else None
    settings = resumed_settings(state, settings) if state else fresh_settings(settings)
    name = settings.tune.name
    assert name is not None
    path = experiment_dir(storage, name)
    if state and state.finished:
        raise TuningError(
            f"experiment {name!r} already finished (registered version {state.version}); "
            "start a new one with `aipd tune`"
        )

    index = index_dataset(settings.data.path)
    index.require_splits("train", "val")
    init_ray(settings)
    use_gpu = settings.tune.gpus_per_trial > 0 and (
        settings.train.use_gpu if settings.train.use_gpu is not None else cluster_has_gpus()
    )
    experiment_id = setup_mlflow(settings)
    client = MlflowClient()
    space = search_space or build_search_space(settings.tune)
    if state is None:
        search_alg = resolve_search_alg(settings.tune.search_alg, space)
        state = ExperimentState(
            name=name,
            parent_run_id=tracking.parent_run(client, experiment_id, settings, space, search_alg, use_gpu),
            experiment_id=experiment_id,
            expected_trials=expected_trials(space, settings.tune.num_samples),
            search_alg=search_alg,
            settings=saved_settings(settings),
        )
        state.save(storage)
    else:
        client.update_run(state.parent_run_id, status="RUNNING")
    log.info(
        "tuning_started",
        experiment=str(path),
        parent_run_id=state.parent_run_id,
        resume=resume,
        search_alg=state.search_alg,
        trials=state.expected_trials,
        use_gpu=use_gpu,
    )

    tuner = _tuner(settings, state, index, use_gpu, space, resume)
    fit_started = time.perf_counter()
    try:
        grid = tuner.fit()
    except BaseException:
        tracking.mark_killed(client, state)
        raise
    fit_wall_s = time.perf_counter() - fit_started

    done = sum(1 for result in grid if _ended(result))
    if len(grid) < state.expected_trials or done < len(grid):
        tracking.mark_killed(client, state)
        raise TuningInterrupted(
            f"experiment {name!r} interrupted after {done} of {state.expected_trials} trials; "
            f"continue it with `aipd tune --resume --name {name}`"
        )
    trials = summarize(grid, settings.tune.epochs, tracking.trial_runs(client, state))
    tracking.close_trial_runs(client, state, trials)
    scored = [t for t in trials if t.best_val_auroc is not None and t.checkpoint_path]
    if not scored:
        client.set_terminated(state.parent_run_id, status="FAILED")
        first_error = next((t.error for t in trials if t.error), "no trial reported a checkpoint")
        raise TuningError(f"every trial of {name!r} failed: {first_error}")
    best = max(scored, key=lambda t: t.best_val_auroc or 0.0)
    checkpoint_dir, val_auroc, version, moved, message = _register_best(settings, index, best, state)
    tracking.finish_parent(client, state, best, trials, val_auroc, version, moved)
    state.finished, state.version = True, version
    state.save(storage)
    log.info(
        "tuning_finished",
        experiment=name,
        best_trial=best.trial_id,
        val_auroc=round(val_auroc, 4),
        version=version,
        champion=moved,
    )
    return TuneOutcome(
        name=name,
        experiment_path=path,
        experiment_id=state.experiment_id,
        parent_run_id=state.parent_run_id,
        search_alg=state.search_alg,
        trials=trials,
        best=best,
        version=version,
        champion_moved=moved,
        champion_message=message,
        checkpoint_dir=checkpoint_dir,
        val_auroc=val_auroc,
        fit_wall_s=fit_wall_s,
        wall_s=time.perf_counter() - started,
        mlflow_link=run_link(settings, state.experiment_id, state.parent_run_id),
        resumed=resume,
    )


def _tuner(
    settings: Settings, state: ExperimentState, index: Any, use_gpu: bool, space: dict[str, Any], resume: bool
) -> Any:
    """A new Tuner, or the interrupted one restored (finished trials kept, errored and unfinished ones run again)."""
    import ray.tune

    path = experiment_dir(settings.ray_storage, state.name)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial,
            settings=settings,
            index=index,
            use_gpu=use_gpu,
            parent_run_id=state.parent_run_id,
            experiment_id=state.experiment_id,
        ),
        {"CPU": TRIAL_DRIVER_CPUS},
    )
    if resume and ray.tune.Tuner.can_restore(str(path)):
        return ray.tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    # a new experiment, or one interrupted before Tune saved anything: nothing finished, start it afresh
    return ray.tune.Tuner(
        trainable,
        param_space=space,
        tune_config=ray.tune.TuneConfig(
            metric=SELECTION_METRIC,
            mode=SELECTION_MODE,
            search_alg=build_search_alg(state.search_alg, settings.train.seed, settings.tune.max_concurrent),
            scheduler=build_scheduler(settings.tune),
            num_samples=settings.tune.num_samples,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=ray.tune.RunConfig(name=path.name, storage_path=str(settings.ray_storage)),
    )


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
        if frame is not None and SELECTION_METRIC in frame and frame[SELECTION_METRIC].notna().any():
            best_auroc = float(frame[SELECTION_METRIC].max())
            epochs_run = int(frame[TIME_ATTR].max()) if TIME_ATTR in frame else len(frame)
            checkpoint = _best_checkpoint(frame)
        status = "finished" if epochs_run >= epochs else "stopped early"
        if result.error is not None:
            status = "error"
        config = result.config or {}
        params = {k: config[k] for k in SEARCH_KEYS if k in config}
        trials.append(
            TrialSummary(
                trial_id=trial_id,
                params=params,
                best_val_auroc=best_auroc,
                epochs_run=epochs_run,
                epochs=epochs,
                status=status,
                run_id=runs.get(trial_id),
                error=_first_line(result.error),
                checkpoint_path=checkpoint,
            )
        )
    return trials


def _best_checkpoint(frame: Any) -> str | None:
    """The checkpoint of the best epoch that Train kept (it keeps the top ones by val AUROC)."""
    from app.checkpoint_files import is_checkpoint

    if "checkpoint_path" not in frame:
        return None
    for _, row in frame.sort_values(SELECTION_METRIC, ascending=False).iterrows():
        path = row["checkpoint_path"]
        if isinstance(path, str) and is_checkpoint(path):
            return path
    return None


def _register_best(settings: Settings, index: Any, best: TrialSummary, state: ExperimentState):
    """Register the best trial's best checkpoint under its child run; the champion rule decides the alias."""
    from app.model import copy_checkpoint
    from training.registration import register_checkpoint

    assert best.checkpoint_path is not None and best.run_id is not None
    checkpoint_dir = copy_checkpoint(best.checkpoint_path, settings.checkpoint_dir(best.run_id))
    version, val_auroc, moved, message = register_checkpoint(
        settings,
        checkpoint_dir,
        best.run_id,
        index,
        tags={"data": settings.data.path, "tune_experiment": state.name, "tune_trial": best.trial_id},
    )
    return checkpoint_dir, val_auroc, version.version, moved, message


def _first_line(error: Any) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1][:300] if text else type(error).__name__


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    return str(value)
