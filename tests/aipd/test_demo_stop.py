"""`aipd demo` stopped by a supervisor: SIGTERM to its pid (docker, Kubernetes) and to its process group. It serves
the champion that exists (no training), so the test is about the stop: within 30 s, exit 143, no stack dump, and
nothing it started left running - Ray, the service, the MLflow server and the Streamlit page."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from app.processes import OWNER_ENV, owner_marker, port_holder
from tests.helpers import ROOT, free_port, make_checkpoint, wait_until, write_learnable_dataset

pytestmark = pytest.mark.slow


def _register_champion(work: Path, tmp_path: Path) -> None:
    """A tiny model as `champion` in the work directory's own store, which the demo's MLflow server opens."""
    import mlflow

    from app.config import Settings
    from app.registry import log_detector, set_alias, setup_mlflow

    settings = Settings(work_dir=work)
    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    version = log_detector(settings, make_checkpoint(tmp_path / "ckpt"), run_id=run.info.run_id, tags={})
    set_alias(settings, version.version)


def _marked(mark: str) -> list[str]:
    left = []
    for process in psutil.process_iter(["pid", "name"]):
        try:
            if process.environ().get(OWNER_ENV) == mark:
                left.append(f"{process.pid} {process.info['name']}")
        except (psutil.Error, OSError):
            continue
    return left


@pytest.mark.parametrize("group", [False, True], ids=["sigterm-to-pid", "sigterm-to-group"])
def test_sigterm_stops_the_demo_and_everything_it_started(tmp_path: Path, group: bool) -> None:
    work = tmp_path / "work"
    _register_champion(work, tmp_path)
    data = write_learnable_dataset(tmp_path / "data", per_class=8)
    serve_port, ui_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIPD_", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(
        {
            "AIPD_WORK_DIR": str(work),
            "AIPD_DATA__PATH": str(data),
            "AIPD_SERVE__PORT": str(serve_port),
            "AIPD_UI__PORT": str(ui_port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    log_path = tmp_path / "demo.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aipd.cli", "demo"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def running() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the demo exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            return "press Ctrl-C to stop everything" in log_path.read_text()

        wait_until(running, 300, interval_s=1.0, what="the demo to serve the champion")
        mark = owner_marker(process.pid)
        assert len(_marked(mark)) >= 3, "its cluster, its MLflow server and its page carry its mark"
        started = time.monotonic()
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            os.kill(process.pid, signal.SIGTERM)
        code = process.wait(timeout=90)
        took = time.monotonic() - started
        output = log_path.read_text()
        assert code == 128 + signal.SIGTERM, output[-3000:]
        assert took <= 30.0, f"stopped in {took:.1f} s"
        assert "SIGTERM received" not in output and "Traceback" not in output, output[-3000:]
        wait_until(lambda: not _marked(mark), 10, what=f"everything the demo started to end: {_marked(mark)}")
        for port in (serve_port, ui_port):
            assert port_holder(port) is None, port
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
