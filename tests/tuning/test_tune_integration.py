"""Real Ray Tune over real Ray Train runs, tracked in a real SQLite MLflow store: a 4-trial search with ASHA, and an
experiment interrupted for real (Ctrl-C to a separate ``aipd tune`` process) that resumes without redoing trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import failure_text, invoke, tiny_tune_settings, tiny_tune_values

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def searched(ray_cluster, small_demo: Path, tmp_path_factory: pytest.TempPathFactory):
    """Four trials, two at a time, on a grid where two learning rates are far too small to learn anything: those
    trials fall behind at the first rung, and ASHA (grace 1 epoch, keep the best half) stops them there."""
    from ray import tune

    from tuning.tune import run_tuning

    settings = tiny_tune_settings(tmp_path_factory.mktemp("tune"), small_demo, name="grid", num_samples=1, epochs=2)
    space = {
        "lr": tune.grid_search([3e-3, 1e-7, 3e-3, 1e-7]),
        "weight_decay": 0.01,
        "dropout": 0.1,
        "batch_size": 8,
        "crop_size": 48,
        "augment_prob": 0.3,
    }
    return settings, run_tuning(settings, search_space=space)


def test_four_trials_finish_and_asha_stops_the_weak(searched) -> None:
    settings, outcome = searched
    assert len(outcome.trials) == 4
    assert all(t.status in ("finished", "stopped early") for t in outcome.trials), [t.error for t in outcome.trials]
    stopped = [t for t in outcome.trials if t.stopped_early]
    assert stopped, "ASHA stopped no trial"
    assert all(t.epochs_run < 2 for t in stopped)
    assert any(t.epochs_run == 2 for t in outcome.trials), "the best trial runs every epoch"
    assert outcome.best.best_val_auroc == max(t.best_val_auroc for t in outcome.trials)


def test_mlflow_has_one_parent_and_a_child_run_per_trial(searched) -> None:
    settings, outcome = searched
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    runs = client.search_runs([outcome.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert [p.info.run_id for p in parents] == [outcome.parent_run_id]
    assert len(children) == 4 and len(runs) == 5, "one run per trial, none per worker"
    by_trial = {t.run_id: t for t in outcome.trials}
    for child in children:
        trial = by_trial[child.info.run_id]
        assert child.info.status == "FINISHED"
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert child.data.params["epochs"] == "2"
        history = client.get_metric_history(child.info.run_id, "val_auroc")
        assert sorted(m.step for m in history) == list(range(trial.epochs_run)), "one value per epoch run"
        assert child.data.tags["stopped_early"] == str(trial.stopped_early).lower()
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_auroc"] == pytest.approx(outcome.best.best_val_auroc)
    assert float(parent.data.params["best.lr"]) == pytest.approx(outcome.best.params["lr"])
    assert parent.data.metrics["trials_stopped_early"] >= 1


def test_best_trial_is_registered_and_becomes_champion(searched) -> None:
    settings, outcome = searched
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    version = client.get_model_version(settings.registered_model, outcome.version)
    assert version.run_id == outcome.best.run_id
    assert version.tags["tune_trial"] == outcome.best.trial_id
    assert version.tags["crop_size"] == "48"
    assert outcome.champion_moved, "there was no champion before"
    assert str(client.get_model_version_by_alias(settings.registered_model, "champion").version) == outcome.version
    assert (outcome.checkpoint_dir / "model.pt").is_file()


def test_summary_table_lists_every_trial(searched) -> None:
    from rich.console import Console

    from tuning.cli import summary_table

    _, outcome = searched
    console = Console(width=200, record=True)
    console.print(summary_table(outcome))
    text = console.export_text()
    for trial in outcome.trials:
        assert trial.trial_id in text
    assert "yes" in text and "2/2" in text


def test_interrupted_experiment_resumes_without_redoing_trials(ray_cluster, small_demo: Path, tmp_path: Path) -> None:
    from aipd.cli import app

    config = tmp_path / "tune.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "work_dir": str(tmp_path),
                "data": {"path": str(small_demo)},
                "train": {"num_workers": 1, "use_gpu": False},
                "tune": tiny_tune_values(epochs=1, num_samples=3),
            }
        )
    )
    address = ray_cluster.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "aipd.cli", "tune", "--config", str(config), "--name", "cut", "--address", address],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            experiment = tmp_path / "ray_results" / "tune-cut"
            deadline = time.time() + 400
            while first.poll() is None and not _finished_trials(experiment) and time.time() < deadline:
                time.sleep(0.5)
            before = _finished_trials(experiment)
            first.send_signal(signal.SIGINT)  # what Ctrl-C sends
            code = first.wait(timeout=180)
        finally:  # a search left running would hold the cluster's CPUs for every later test
            if first.poll() is None:
                first.kill()
                first.wait()
    output = log_path.read_text()
    assert before, "no trial finished before the deadline:\n" + output[-3000:]
    assert code == 130, output[-3000:]
    assert "aipd tune --resume --name cut" in output
    state = json.loads((tmp_path / "ray_results" / "tune-cut.aipd.json").read_text())
    assert not state["finished"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"

    result = invoke(app, ["tune", "--config", str(config), "--resume"])
    assert result.exit_code == 0, failure_text(result)
    assert "tuning experiment cut: 3 trials" in result.output
    assert "MLflow: http" in result.output

    trial_dirs = sorted(p.name for p in experiment.glob("trial_*"))
    assert len(trial_dirs) == 3, trial_dirs
    for trial_id, lines in before.items():
        assert _finished_trials(experiment)[trial_id] == lines, f"finished trial {trial_id} ran again"
    children = client.search_runs(
        [state["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'"
    )
    assert len(children) == 3, "the resumed experiment kept its parent run and made no extra trial runs"
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"
    assert json.loads((tmp_path / "ray_results" / "tune-cut.aipd.json").read_text())["finished"]


def _finished_trials(experiment: Path) -> dict[str, int]:
    """Trials whose result log ends with Tune's ``done`` mark, with the number of results they logged."""
    finished = {}
    for path in experiment.glob("trial_*/result.json"):
        lines = []
        for line in path.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:  # a line Tune is still writing
                break
        if lines and lines[-1].get("done"):
            finished[path.parent.name] = len(lines)
    return finished


def test_fractional_gpus_reach_the_train_workers(ray_cluster, small_demo: Path, tmp_path: Path) -> None:
    """Built only, not fitted (no GPU here): the trainer a trial would run asks each worker for a quarter GPU."""
    from app.data import index_dataset
    from training.trainer import build_trainer
    from tuning.tune import with_worker_gpus

    settings = tiny_tune_settings(tmp_path, small_demo, name="gpu")
    trainer = build_trainer(settings, index_dataset(str(small_demo)), use_gpu=True, name="t", overrides={"lr": 1e-3})
    packed = with_worker_gpus(trainer, 0.25)
    assert packed.scaling_config.use_gpu
    assert packed.scaling_config.resources_per_worker == {"CPU": settings.train.cpus_per_worker, "GPU": 0.25}
    assert packed.train_loop_config == trainer.train_loop_config
    assert packed.run_config.name == "t" and set(packed.datasets) == {"train", "val"}
