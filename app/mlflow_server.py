"""A local MLflow tracking server over the work directory's store, for `aipd demo`.

The demo prints the MLflow address as a page to open, not a command to run: it starts `mlflow server` on a free
port over the same SQLite store and artifact folder every other command uses, points its own processes (training,
Serve replicas) at it, and stops it with everything else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from app.child_process import wait_for_health
from app.config import Settings, reachable_url
from app.errors import UserError
from app.processes import OWNER_ENV, owner_marker


class MlflowServerError(UserError, RuntimeError):
    """The MLflow server did not come up; the message says where its log is."""


@dataclass
class MlflowServer:
    process: subprocess.Popen
    url: str
    log_path: Path

    def wait_until_up(self, timeout_s: float = 120.0) -> MlflowServer:
        outcome = wait_for_health(f"{self.url}/health", self.process, timeout_s, interval_s=0.5)
        if outcome == "up":
            return self
        if outcome == "exited":
            raise MlflowServerError(
                f"the MLflow server exited with code {self.process.returncode} before answering on {self.url} "
                f"(its log: {self.log_path})"
            )
        self.stop()
        raise MlflowServerError(
            f"the MLflow server did not answer on {self.url} within {timeout_s:.0f} s (its log: {self.log_path})"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the whole process group: `mlflow server` runs uvicorn as a child, and the parent alone lingers."""
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def mlflow_server_command(settings: Settings, port: int, host: str = "127.0.0.1") -> list[str]:
    """One worker process (the default four cost a core each to start); artifacts are written by the clients
    straight into the work directory, as without a server, so runs logged before and after it look the same."""
    store = settings.tracking_uri
    if not store.startswith("sqlite:///"):
        raise MlflowServerError(f"a local MLflow server is started only over a SQLite store, not {store}")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--default-artifact-root",
        settings.artifact_location,
        "--no-serve-artifacts",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def start_mlflow_server(settings: Settings, port: int, *, log: IO[str], log_path: Path) -> MlflowServer:
    """Start the server and return at once: a new store's migrations take a while, and the caller has other things
    to start meanwhile (`MlflowServer.wait_until_up` before first use)."""
    Path(settings.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        mlflow_server_command(settings, port),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        # no job runner (processes we never use); the owner's mark, so a killed demo's server is found later
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", OWNER_ENV: owner_marker()},
        start_new_session=True,  # its own process group, stopped as one; and Ctrl-C in the terminal is ours to handle
    )
    return MlflowServer(process, reachable_url("127.0.0.1", port), log_path)
