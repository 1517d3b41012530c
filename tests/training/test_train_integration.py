"""Real training on a real Ray cluster with a real SQLite MLflow store: registration, the champion rule,
``aipd evaluate --json``, and recovery from a killed worker.

The module's run decodes and augments in the training workers (`train.decode_on: workers`, what a GPU run does by
default, here on the CPU), with the next epoch's data started during validation; the other suites train with
Ray Data's tasks decoding."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ray.train import UserCallback
from typer.testing import CliRunner

from tests.helpers import tiny_settings

pytestmark = pytest.mark.slow

EVALUATE_KEYS = {
    "auroc",
    "ap",
    "accuracy",
    "real_accuracy",
    "ai_accuracy",
    "tpr_at_1pct_fpr",
    "ece",
    "threshold",
    "blurred_real_flag_rate",
    "robustness",
}


# The main thread's Ctrl-C handler before and after the module's training run (see the test that reads it).
SIGINT_HANDLERS: dict[str, object] = {}


@pytest.fixture(scope="module")
def trained(ray_cluster, small_demo: Path, tmp_path_factory: pytest.TempPathFactory):
    from training.trainer import run_training

    settings = tiny_settings(tmp_path_factory.mktemp("work"), small_demo, decode_on="workers")
    SIGINT_HANDLERS["before"] = signal.getsignal(signal.SIGINT)
    outcome = run_training(settings)
    SIGINT_HANDLERS["after"] = signal.getsignal(signal.SIGINT)
    return settings, outcome


def test_ctrl_c_still_reaches_the_caller_after_training(trained) -> None:
    # Ray Train leaves its own SIGINT handler behind; `aipd demo` keeps serving after training and must stop on Ctrl-C.
    assert SIGINT_HANDLERS["after"] is SIGINT_HANDLERS["before"]


def test_two_worker_run_is_tracked_and_registered(trained) -> None:
    settings, outcome = trained
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["ray"] and run.data.tags["torch"]
    assert run.data.params["train.decode_on"] == "workers"
    assert run.data.metrics["train_images_per_s"] > 0
    history = client.get_metric_history(outcome.run_id, "val_auroc")
    assert sorted(m.step for m in history) == [0, 1], "one value per epoch, logged once (rank 0 only)"
    assert "test_auroc" in run.data.metrics and "test_robust_jpeg_q75" in run.data.metrics
    runs = client.search_runs([run.info.experiment_id])
    assert len(runs) == 1, "one MLflow run per training, not one per worker"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "evaluation")}
    assert {"evaluation/evaluation.md", "evaluation/roc.png", "evaluation/reliability.png"} <= artifacts

    version = client.get_model_version(settings.registered_model, outcome.version)
    assert version.run_id == outcome.run_id
    assert 0.0 <= float(version.tags["threshold"]) <= 1.0
    assert version.tags["crop_size"] == "48"
    assert outcome.champion_moved
    assert str(client.get_model_version_by_alias(settings.registered_model, "champion").version) == outcome.version


def test_champion_rule_keeps_and_moves(trained, small_demo: Path, tmp_path: Path) -> None:
    import torch

    from app.data import index_dataset
    from app.model import build_model, load_checkpoint, save_checkpoint
    from app.registry import apply_champion_rule, get_alias_version, log_detector, set_alias
    from app.scoring import validation_auroc

    settings, outcome = trained
    limits = settings.images
    val = index_dataset(str(small_demo)).split("val")
    # Two real models the rule must judge on the validation split, one strictly better whatever the tiny run learned
    # (it can end constant, AUROC exactly 0.5): a freshly initialised detector, whose scores vary from image to image,
    # and the same with its verdicts inverted, which scores about 1 - its AUROC. Registered as versions of their own.
    trained_model = load_checkpoint(outcome.checkpoint_dir)
    torch.manual_seed(7)
    fresh = build_model(trained_model.model_cfg).eval()
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment_id = client.get_run(outcome.run_id).info.experiment_id
    versions, aurocs = [], []
    for name in ("fresh", "inverted"):
        if name == "inverted":
            with torch.no_grad():
                fresh.head[-1].weight.neg_()
                fresh.head[-1].bias.neg_()
        directory = save_checkpoint(
            tmp_path / name, fresh, trained_model.model_cfg, trained_model.preprocess, threshold=0.5
        )
        run = client.create_run(experiment_id, run_name=name)
        versions.append(log_detector(settings, directory, run_id=run.info.run_id, tags={"threshold": 0.5}).version)
        aurocs.append(validation_auroc(load_checkpoint(directory), val, limits))
    assert aurocs[1] == pytest.approx(1.0 - aurocs[0], abs=0.05)
    assert aurocs[0] != aurocs[1], "the rule needs one model strictly better than the other"
    (better, better_auroc), (worse, worse_auroc) = sorted(zip(versions, aurocs, strict=True), key=lambda v: -v[1])

    set_alias(settings, better)
    moved, message = apply_champion_rule(settings, worse, worse_auroc, val)
    assert not moved and "stays" in message
    assert get_alias_version(settings).version == better

    set_alias(settings, worse)
    moved, message = apply_champion_rule(settings, better, better_auroc, val)
    assert moved and "beats" in message
    assert get_alias_version(settings).version == better
    set_alias(settings, outcome.version)


def test_evaluate_json_has_every_key(trained, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aipd.cli import app
    from app.degradations import sweep
    from app.model import load_checkpoint

    settings, outcome = trained
    monkeypatch.setenv("AIPD_WORK_DIR", str(settings.work_dir))
    result = CliRunner().invoke(app, ["evaluate", "--data", str(small_demo), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) >= EVALUATE_KEYS
    assert set(report["robustness"]) == set(sweep())
    assert set(report["flip_rate"]) == {"downscale_0.5", "jpeg_q75", "downscale_0.5_then_jpeg_q75"}
    # the demo data names each AI photo's generator: the model has the source head, and its accuracy per family
    families = load_checkpoint(outcome.checkpoint_dir).model_cfg.source_families
    assert families[0] == "none" and len(families) > 2
    assert set(report["source_accuracy"]) == set(families)
    assert all(0.0 <= value <= 1.0 for value in report["source_accuracy"].values())
    assert 0.0 <= report["blurred_real_flag_rate"] <= 1.0
    assert report["threshold"] == pytest.approx(
        float(
            MlflowClient(tracking_uri=settings.tracking_uri)
            .get_model_version(settings.registered_model, outcome.version)
            .tags["threshold"]
        )
    )


def test_evaluate_says_when_there_is_no_model(
    tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aipd.cli import app

    monkeypatch.setenv("AIPD_WORK_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["evaluate", "--data", str(small_demo), "--json"])
    assert result.exit_code == 1
    assert "aipd train" in result.output
    assert "Traceback" not in result.output


def test_a_killed_worker_is_replaced_and_the_run_resumes(ray_cluster, small_demo: Path, tmp_path: Path) -> None:
    from training.trainer import run_training

    settings = tiny_settings(tmp_path, small_demo, epochs=5, max_failures=2)
    earlier = set(_train_worker_pids())  # workers of earlier runs may linger; only this run's may be killed
    box: dict[str, object] = {}
    thread = threading.Thread(target=lambda: box.setdefault("outcome", _catching(run_training, settings, box)))
    thread.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and killed is None:
        time.sleep(0.5)
        run_id = _running_run(settings)
        # two epochs logged and a checkpoint registered by Ray's controller: a worker killed before the
        # controller has taken a report restarts from scratch, which is not what this test is about
        if (
            run_id
            and len(MlflowClient(tracking_uri=settings.tracking_uri).get_metric_history(run_id, "val_auroc")) >= 2
            and _checkpoint_registered(settings)
        ):
            workers = [pid for pid in _train_worker_pids() if pid not in earlier]
            if workers:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
    thread.join(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed"
    assert "error" not in box, box.get("error")
    outcome = box["outcome"]
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(outcome.run_id, "resumed_from_epoch"), "the restarted workers loaded a checkpoint"
    assert outcome.epochs_run == 5


def test_a_run_restarted_after_its_last_checkpoint_ends_with_its_result(
    ray_cluster, small_demo: Path, tmp_path: Path
) -> None:
    """A resumed search restarts a trial whose Train run had saved its last epoch before Ctrl-C: Ray Train hands
    the run that checkpoint, nothing is left to train, and the run must still end with its metrics (Tune refuses a
    trial whose last result lacks the metric it optimises)."""
    from app.data import index_dataset
    from training.trainer import build_trainer

    settings = tiny_settings(tmp_path, small_demo, epochs=1, num_workers=1)
    index = index_dataset(str(small_demo))
    reports = tmp_path / "reports.jsonl"
    first = build_trainer(settings, index, use_gpu=False, name="restarted").fit()
    again = build_trainer(settings, index, use_gpu=False, name="restarted", callbacks=[_ReportLog(str(reports))]).fit()
    reported = [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []
    assert len(reported) == 1, "the restarted run reported its last epoch once, and trained nothing"
    assert reported[0]["epoch"] == 0 and reported[0]["val_auroc"] == first.metrics["val_auroc"]
    assert Path(again.checkpoint.path).name == Path(first.checkpoint.path).name


def test_the_workers_hold_after_the_epoch_until_the_file_exists(ray_cluster, small_demo: Path, tmp_path: Path) -> None:
    """The demo's hold: after epoch 1 of 2 the run waits, reporting nothing more, until the file is written."""
    from app.data import index_dataset
    from training.trainer import build_trainer

    settings = tiny_settings(tmp_path, small_demo, epochs=2, num_workers=1)
    reports, release = tmp_path / "reports.jsonl", tmp_path / "release"
    trainer = build_trainer(
        settings,
        index_dataset(str(small_demo)),
        use_gpu=False,
        name="held",
        callbacks=[_ReportLog(str(reports))],
        hold=(1, release),
    )
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=trainer.fit()), daemon=True)
    thread.start()

    def reported() -> int:
        return len(reports.read_text().splitlines()) if reports.exists() else 0

    deadline = time.monotonic() + 300
    while reported() < 1 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert reported() == 1, "epoch 1 was reported"
    time.sleep(10)  # an unheld second epoch of this size takes a few seconds
    assert reported() == 1 and thread.is_alive(), "the run went on before the file existed"
    release.touch()
    thread.join(timeout=300)
    assert not thread.is_alive() and box["result"].error is None
    assert [json.loads(line)["epoch"] for line in reports.read_text().splitlines()] == [0, 1]


class _ReportLog(UserCallback):
    """Runs in Ray Train's controller: appends each report's metrics to a file the test reads."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(metrics[0]) + "\n")


def _train_worker_pids() -> list[int]:
    """Ray names its worker processes after the actor they host (ray::RayTrainWorker...)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return sorted(pids)


def _checkpoint_registered(settings) -> bool:
    """Ray Train's controller writes this snapshot after it registers a reported checkpoint."""
    for snapshot in Path(settings.ray_storage).rglob("checkpoint_manager_snapshot.json"):
        try:
            if "epoch_" in snapshot.read_text():
                return True
        except OSError:
            pass
    return False


def _catching(fn, settings, box):
    try:
        return fn(settings)
    except Exception as err:  # noqa: BLE001 - surfaced by the assertion in the test thread
        box["error"] = repr(err)
        return None


def _running_run(settings) -> str | None:
    client = MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'RUNNING'")
    return runs[0].info.run_id if runs else None
