"""MLflow down when a training ends: a real `mlflow server` process as the tracking server, killed once the last
epoch is logged, so `aipd train` fits on real Ray and then finds no registry; `aipd register` finishes the job once the
server is back."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from tests.helpers import free_port, invoke, make_checkpoint, wait_until

pytestmark = pytest.mark.slow

EPOCHS = 1
TINY_TRAINING = ["--epochs", str(EPOCHS), "--workers", "1", "--no-gpu", "--batch-size", "8", "--image-size", "48"]


class MlflowServer:
    """`mlflow server` (app/mlflow_server.py's command) over a SQLite store under `root`, in a process group of its
    own, so that a crash (SIGKILL) takes down every process it started."""

    def __init__(self, root: Path) -> None:
        from app.config import Settings

        self.root, self.port = root, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = Settings(work_dir=root, mlflow_tracking_uri=None)  # its own SQLite store, whatever AIPD_* say
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        from app.mlflow_server import mlflow_server_command

        command = mlflow_server_command(self.store, self.port)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # its 8 job-runner processes: not needed
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - the child's output, kept for a failing test
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until(self.answers, 120, interval_s=0.5, what=f"mlflow server on port {self.port} (see server.log)")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        """The server crashes: SIGKILL to its whole process group."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        wait_until(lambda: not self.answers(), 30, what="the mlflow server to stop answering")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> MlflowServer:
    root = tmp_path / "mlflow"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    yield server
    server.kill()


def _kill_after_last_epoch(server: MlflowServer, experiment: str, stopped: dict[str, float]) -> None:
    """Watch the tracking server for the training run's last epoch, then kill it: the fit is over, registration not."""
    client = MlflowClient(tracking_uri=server.url)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
        if any(len(client.get_metric_history(run.info.run_id, "val_auroc")) >= EPOCHS for run in runs):
            server.kill()
            stopped["at"] = time.monotonic()
            return
        time.sleep(0.3)


def _register_champion(settings, root: Path) -> str:
    """A first version under `champion`, so that registering the trained model has a champion to beat."""
    import mlflow

    from app.registry import log_detector, set_alias, setup_mlflow

    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    checkpoint = make_checkpoint(root / "first-champion", seed=4, crop_size=48)
    version = log_detector(settings, checkpoint, run_id=run.info.run_id, tags={}).version
    set_alias(settings, version)
    return version


def test_mlflow_down_when_training_ends_keeps_the_model_for_aipd_register(
    ray_cluster,
    small_demo: Path,
    tmp_path: Path,
    mlflow_server: MlflowServer,
    restore_mlflow_uris: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fault: the MLflow tracking server (a real `mlflow server` process) is killed after the last epoch is logged and
    before the model is registered.

    May be lost: nothing. `aipd train` ends with one line naming the kept checkpoint and the `aipd register` command;
    that command, run once MLflow is back, evaluates and registers the model under its training run and applies the
    champion rule against the champion registered before the training.
    """
    from aipd.cli import app
    from app.checkpoint_files import is_checkpoint
    from app.config import Settings

    work = tmp_path / "work"
    monkeypatch.setenv("AIPD_WORK_DIR", str(work))
    monkeypatch.setenv("AIPD_MLFLOW_TRACKING_URI", mlflow_server.url)
    settings = Settings()
    champion = _register_champion(settings, tmp_path)

    stopped: dict[str, float] = {}
    watcher = threading.Thread(
        target=_kill_after_last_epoch, args=(mlflow_server, settings.mlflow_experiment, stopped), daemon=True
    )
    watcher.start()
    train = invoke(app, ["train", "--data", str(small_demo), *TINY_TRAINING])
    train_ended_s = time.monotonic() - stopped.get("at", time.monotonic())
    watcher.join(timeout=30)
    assert "at" in stopped, "the training ended before the tracking server could be killed"
    assert train.exit_code == 1, train.output[-3000:]
    errors = [line for line in train.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in train.output, train.output[-3000:]
    line = errors[0]
    assert "the trained model is kept in" in line and "aipd register" in line, line
    command = shlex.split(line.split("register it with: ", 1)[1])
    assert command[:2] == ["aipd", "register"]
    checkpoint = Path(command[2])
    assert is_checkpoint(checkpoint) and checkpoint.is_relative_to(work.resolve())
    run_id = command[command.index("--run-id") + 1]

    restarting = time.monotonic()
    mlflow_server.start()
    registering = time.monotonic()
    registered = invoke(app, command[1:])
    registered_s, restart_s = time.monotonic() - registering, registering - restarting
    assert registered.exit_code == 0, registered.output[-3000:]
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions(f"name = '{settings.registered_model}'")
    new = [v for v in versions if v.run_id == run_id]
    assert len(versions) == 2 and len(new) == 1, "one new version: the trained model, registered once"
    new_version = str(new[0].version)
    assert f"registered {settings.registered_model} version {new_version}" in registered.output
    alias = str(client.get_model_version_by_alias(settings.registered_model, settings.champion_alias).version)
    if "beats" in registered.output:
        assert alias == new_version, registered.output
    else:
        assert f"champion stays at version {champion}" in registered.output and alias == champion
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_auroc" in run.data.metrics
    assert run.data.tags["champion"] == str(alias == new_version).lower()
    print(
        f"\nmlflow down: `aipd train` ended {train_ended_s:.1f} s after the server died; the server restarted in "
        f"{restart_s:.1f} s; `aipd register` took {registered_s:.1f} s\n{line}"
    )


def test_aipd_register_refuses_what_is_no_checkpoint_in_one_line(tmp_path: Path) -> None:
    from aipd.cli import app

    result = invoke(app, ["register", str(tmp_path)])
    assert result.exit_code == 1
    assert f"{tmp_path} is not a checkpoint directory" in result.output and "Traceback" not in result.output
