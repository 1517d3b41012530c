"""The MLflow bookkeeping of a search: one parent run per experiment, one nested child run per trial.

A trial's driver creates (or, after ``--resume``, reopens) its child run and hands it to rank 0, which logs the
per-epoch metrics; the experiment's driver closes the runs ASHA stopped mid-way and marks an interrupted search KILLED.
"""

from __future__ import annotations

from typing import Any

from app.config import Settings
from tuning.experiment import ExperimentState
from tuning.search_space import SEARCH_KEYS

TRIAL_TAG = "aipd.tune_trial_id"
PARENT_TAG = "mlflow.parentRunId"


def parent_run(
    client: Any, experiment_id: str, settings: Settings, space: dict[str, Any], search_alg: str, use_gpu: bool
) -> str:
    run = client.create_run(
        experiment_id,
        run_name=f"tune-{settings.tune.name}",
        tags={"aipd.stage": "tune", "aipd.tune_experiment": str(settings.tune.name)},
    )
    params = {f"tune.{k}": v for k, v in settings.tune.model_dump().items() if k not in SEARCH_KEYS}
    params.update({f"space.{k}": describe(v) for k, v in space.items()})
    params.update(
        {
            "search_alg_used": search_alg,
            "data": settings.data.path,
            "use_gpu": use_gpu,
            "train.num_workers": settings.train.num_workers,
            "model.backbone": settings.model.backbone,
        }
    )
    client.log_batch(run.info.run_id, params=params_of(params))
    return run.info.run_id


def child_run(
    client: Any, experiment_id: str, parent_run_id: str, trial_id: str, config: dict[str, Any], epochs: int
) -> str:
    """The trial's nested run; a restarted trial (after ``--resume``) finds and reuses the one it had."""
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "resumed", "true")
        return run_id
    run = client.create_run(
        experiment_id,
        run_name=f"trial_{trial_id}",
        tags={PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id},
    )
    client.log_batch(run.info.run_id, params=params_of({**config, "epochs": epochs}))
    return run.info.run_id


def trial_runs(client: Any, state: ExperimentState) -> dict[str, str]:
    """Trial id -> its child run id."""
    runs = client.search_runs([state.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{state.parent_run_id}'")
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def close_trial_runs(client: Any, state: ExperimentState, trials: list[Any]) -> None:
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
    for run in _running_children(client, state):
        client.set_terminated(run.info.run_id, status="FAILED")


def mark_killed(client: Any, state: ExperimentState) -> None:
    """An interrupted experiment shows as KILLED in MLflow until ``--resume`` reopens its runs."""
    for run in _running_children(client, state):
        client.set_terminated(run.info.run_id, status="KILLED")
    client.set_terminated(state.parent_run_id, status="KILLED")


def finish_parent(
    client: Any, state: ExperimentState, best: Any, trials: list[Any], val_auroc: float, version: str, moved: bool
) -> None:
    """The search's result on its parent run: the best trial's parameters and score, what was registered."""
    client.log_batch(state.parent_run_id, params=params_of({f"best.{k}": v for k, v in best.params.items()}))
    client.log_metric(state.parent_run_id, "best_val_auroc", float(best.best_val_auroc or 0.0))
    client.log_metric(state.parent_run_id, "registered_val_auroc", val_auroc)
    client.log_metric(state.parent_run_id, "trials", len(trials))
    client.log_metric(state.parent_run_id, "trials_stopped_early", sum(t.stopped_early for t in trials))
    for key, value in {
        "best_trial": best.trial_id,
        "best_run_id": best.run_id or "",
        "registered_version": version,
        "champion": str(moved).lower(),
    }.items():
        client.set_tag(state.parent_run_id, key, value)
    client.set_terminated(state.parent_run_id, status="FINISHED")


def _running_children(client: Any, state: ExperimentState) -> list[Any]:
    return client.search_runs(
        [state.experiment_id],
        filter_string=(f"tags.`{PARENT_TAG}` = '{state.parent_run_id}' and attributes.status = 'RUNNING'"),
    )


def params_of(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, str(v)) for k, v in values.items()]


def describe(value: Any) -> str:
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
