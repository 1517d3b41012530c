"""`aipd demo` end to end on a tiny configuration: data, training, registry, Serve, UI, sample predictions, stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import free_port

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_stops(tmp_path: Path) -> None:
    serve_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "AIPD_WORK_DIR": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "RAY_ADDRESS": "",
        "AIPD_DATA__DEMO_IMAGES_PER_CLASS": "40",
        "AIPD_DATA__DEMO_SIZE": "64",
        "AIPD_TRAIN__EPOCHS": "2",
        "AIPD_DEMO__TRAIN_EPOCHS": "1",
        "AIPD_TRAIN__CROP_SIZE": "48",
        "AIPD_TRAIN__BATCH_SIZE": "8",
        "AIPD_SERVE__PORT": str(serve_port),
        "AIPD_UI__PORT": str(ui_port),
    }
    env.pop("RAY_ADDRESS")
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--exit-after-predictions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "registered aipd-detector version 1" in done.stdout
    assert "sample predictions through the HTTP API" in done.stdout
    assert done.stdout.count("real") >= 3 and "ai_generated" in done.stdout
    assert f"http://127.0.0.1:{serve_port}" in done.stdout
    assert f":{ui_port}" in done.stdout, "the Streamlit address is printed"
    assert "mlflow ui --backend-store-uri" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [run.data.metrics["epochs_run"] for run in runs] == [1.0], (
        "the demo trains demo.train_epochs, not train.epochs"
    )
    assert float(runs[0].data.params["train.lr"]) == 3e-3, "the demo's short schedule takes demo.train_lr"
    assert "the threshold set on validation data" in " ".join(done.stdout.split()), (
        "the verdicts' threshold is explained"
    )
    # everything it started is stopped: nothing listens on its ports any more
    for port in (serve_port, ui_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after the demo stopped"
