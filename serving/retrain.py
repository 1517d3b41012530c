"""Drift that acts: an Alertmanager webhook turns a firing drift alert into a retraining job on the Ray cluster.

Alertmanager posts its alerts to the service (`POST /alerts`); when one of the drift alerts fires and retraining is
configured (`serve.retrain_data`, labelled photos such as recent moderated uploads), the service submits `aipd train
--challenger P` as a Ray job (Ray's job submission API, so the job shows in the Ray dashboard with its logs), and
records the job in the registry, where `aipd rollout status` shows it. The job trains on that data, registers its
model in MLflow and starts it as a canary beside the champion; the rollout's own rules then promote nothing on their
own and roll it back if it does worse. One retraining at a time: an alert that keeps firing while a job runs, or while
its challenger is on trial, starts no second one. Two alerts that arrive together (two drift rules firing, or two
ingress replicas) could both find no job running; so each job's submission id is the champion's version and the
count of retrainings of it so far, and Ray's job API, which refuses an id it has seen, lets only the first through.
"""

from __future__ import annotations

import shlex
import sys
import time
from typing import Any

import yaml

from app.config import Settings
from app.drift import DRIFT_ALERTS
from app.rollout import TAG

JOB_TAG = TAG + "retrain_job"
ACTIVE_JOB_STATES = ("PENDING", "RUNNING")


def firing_drift_alerts(payload: dict[str, Any]) -> list[str]:
    """The drift alerts an Alertmanager webhook payload reports as firing (resolved ones start nothing)."""
    alerts = payload.get("alerts") if isinstance(payload, dict) else None
    names = []
    for alert in alerts if isinstance(alerts, list) else []:
        labels = alert.get("labels") if isinstance(alert, dict) else None
        name = labels.get("alertname") if isinstance(labels, dict) else None
        if name in DRIFT_ALERTS and alert.get("status", "firing") == "firing":
            names.append(name)
    return sorted(set(names))


def start_retraining(settings: Settings, reason: str) -> tuple[str | None, str]:
    """Submit the retraining job unless one runs or its challenger is on trial; (job id or None, what happened).
    Blocking (the job API and the registry are HTTP): call it from a worker thread."""
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient

    from app.registry import get_alias_version, setup_mlflow
    from app.rollout import current_rollout

    if not settings.serve.retrain_data:
        return None, "retraining is off (serve.retrain_data names no labelled data)"
    setup_mlflow(settings)
    jobs = JobSubmissionClient()  # the cluster's dashboard, as the replica's environment names it
    client = MlflowClient()
    name = settings.registered_model
    previous = (client.get_registered_model(name).tags or {}).get(JOB_TAG)
    if previous and _state(jobs, previous) in ACTIVE_JOB_STATES:
        return None, f"retraining job {previous} is still running"
    if current_rollout(settings) is not None:
        return None, "a challenger is on trial already; end it first (`aipd rollout promote|abort`)"
    config = settings.work_dir.resolve() / "retrain" / f"settings-{time.strftime('%Y%m%d-%H%M%S')}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude={"api_keys", "ray_address"})))
    entrypoint = shlex.join(
        [
            sys.executable,
            "-m",
            "aipd.cli",
            "train",
            "--config",
            str(config),
            "--data",
            settings.serve.retrain_data,
            "--challenger",
            str(settings.serve.retrain_percent),
            *_this_cluster(),
        ]
    )
    champion = get_alias_version(settings)
    prefix = f"aipd-retrain-v{champion.version if champion else 'none'}-"
    earlier = sum(1 for info in jobs.list_jobs() if (info.submission_id or "").startswith(prefix))
    submission_id = f"{prefix}{earlier + 1}"
    try:
        job = jobs.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            metadata={"reason": reason[:200], "by": "aipd drift webhook"},
        )
    except Exception:
        if _submitted(jobs, submission_id):  # a concurrent alert won the id: its job is the one retraining
            return None, f"retraining job {submission_id} was just submitted for another alert"
        raise
    client.set_registered_model_tag(name, TAG + "retrain_reason", reason[:500])
    client.set_registered_model_tag(name, TAG + "retrain_at", str(time.time()))
    client.set_registered_model_tag(name, JOB_TAG, job)  # last: a reader that finds the job finds all of it
    return job, f"retraining job {job} submitted: {reason}"


def _this_cluster() -> list[str]:
    """The job's `--address`: the GCS of the cluster this replica runs on. Without it the job's driver joins the
    cluster Ray's job supervisor finds in the machine's address file, which names the last cluster made there:
    another one, on a machine that runs two."""
    import ray

    return ["--address", ray.get_runtime_context().gcs_address] if ray.is_initialized() else []


def retraining(settings: Settings, *, ask_cluster: bool) -> dict[str, Any] | None:
    """The last retraining job the registry records, and its state when ``ask_cluster`` (from inside the cluster:
    a command elsewhere does not know where its dashboard is)."""
    from mlflow import MlflowClient

    tags = MlflowClient().get_registered_model(settings.registered_model).tags or {}
    job = tags.get(JOB_TAG)
    if not job:
        return None
    state = "unknown"
    if ask_cluster:
        from ray.job_submission import JobSubmissionClient

        try:
            state = _state(JobSubmissionClient(), job)
        except Exception:  # noqa: BLE001 - the job API not answering leaves the registry's record
            state = "unknown"
    return {
        "job": job,
        "state": state,
        "reason": tags.get(TAG + "retrain_reason", ""),
        "submitted_at": float(tags.get(TAG + "retrain_at", 0.0)),
    }


def _submitted(jobs: Any, job: str) -> bool:
    try:
        jobs.get_job_info(job)
    except Exception:  # noqa: BLE001 - the job API says "not found" with a RuntimeError
        return False
    return True


def _state(jobs: Any, job: str) -> str:
    status = jobs.get_job_status(job)
    return str(getattr(status, "value", status))
