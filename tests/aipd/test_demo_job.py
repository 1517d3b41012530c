"""`aipd demo` end to end on a tiny configuration: a first model served early, the finished one switched in live
with no failed request, a quiet terminal, a real MLflow server, and everything stopped at the end."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import free_port, write_learnable_dataset

pytestmark = pytest.mark.slow

QUIET_LINES_BEFORE_VERDICTS = 60


def test_demo_serves_early_then_switches_live_without_a_failed_request(tmp_path: Path) -> None:
    data = write_learnable_dataset(tmp_path / "data", per_class=40)
    serve_port, ui_port = free_port(), free_port()
    env = {
        **os.environ,
        "AIPD_WORK_DIR": str(tmp_path / "work"),
        "PYTHONUNBUFFERED": "1",
        "AIPD_DATA__PATH": str(data),
        "AIPD_TRAIN__EPOCHS": "4",
        "AIPD_TRAIN__CROP_SIZE": "48",
        "AIPD_TRAIN__BATCH_SIZE": "8",
        "AIPD_DEMO__FIRST_MODEL_EPOCH": "1",
        # the residual verdict tells this data's noise apart from epoch 1 on (validation AUROC 1.0 for both models),
        # so no finished model could beat the first: the live switch is what this test is about
        "AIPD_MODEL__RESIDUAL_VERDICT": "false",
        "AIPD_SERVE__PORT": str(serve_port),
        "AIPD_UI__PORT": str(ui_port),
    }
    for inherited in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(inherited, None)
    env.pop("AIPD_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "-m", "aipd.cli", "demo", "--exit-after-predictions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    text = " ".join(done.stdout.split())

    # served early: the first model is epoch 1's, registered as version 1 and answering the samples
    assert "first model: epoch 1 of 4" in text and "registered as version 1" in text
    assert "sample predictions through the HTTP API by version 1" in text
    # then the finished model beats it, the champion moves and the running service switches, with no failed request
    assert "finished model: 4 epochs" in text and "registered as version 2" in text
    assert "champion -> version 2" in text, text[-3000:]
    assert "the service switched from version 1 to 2" in text
    assert "sample predictions through the HTTP API by version 2" in text
    requests = re.search(r"(\d+) requests while training finished and the champion moved, (\d+) failed", text)
    assert requests is not None, text[-3000:]
    assert int(requests.group(1)) > 0 and int(requests.group(2)) == 0

    # quiet: the lines a person reads before the first verdicts, none of Ray's, Serve's or MLflow's own
    before = output.split("sample predictions through the HTTP API")[0]
    assert len(before.splitlines()) <= QUIET_LINES_BEFORE_VERDICTS, before
    for chatter in ("(raylet)", "INFO", "Created version", "View run", "Started a local Ray instance"):
        assert chatter not in output, f"{chatter!r} reached the terminal"
    log_file = tmp_path / "work" / "logs" / "aipd.log"
    assert "Created version '2'" in log_file.read_text(), "what the terminal leaves out is in the log file"

    # MLflow: a real server was printed and ran; the first model has its own nested run with its own test AUROC
    mlflow_url = re.search(r"MLflow\s+│?\s*(http://127\.0\.0\.1:\d+)", done.stdout)
    assert mlflow_url is not None, done.stdout[-3000:]
    assert "Uvicorn running" in (tmp_path / "work" / "logs" / "mlflow.log").read_text()
    store = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # not a registry an earlier test left set
    first = client.get_model_version("aipd-detector", "1")
    first_run = client.get_run(first.run_id)
    assert first_run.data.tags["mlflow.parentRunId"] == client.get_model_version("aipd-detector", "2").run_id
    assert "test_auroc" in first_run.data.metrics and first_run.info.status == "FINISHED"
    assert str(client.get_model_version_by_alias("aipd-detector", "champion").version) == "2"

    # everything it started is stopped: nothing listens on its ports any more
    mlflow_port = int(mlflow_url.group(1).rsplit(":", 1)[1])
    for port in (serve_port, ui_port, mlflow_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers after the demo stopped"
