"""Start and stop the Streamlit server as a child process, for `aipd ui` and `aipd demo`.

The page runs in its own process (Streamlit owns its event loop and script reruns), so it gets its settings the way
any aipd process does: AIPD_UI__* environment variables, set here from the caller's already-resolved settings.
A YAML file given to the parent therefore reaches the page too, without the page knowing about it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import IO

from app.child_process import wait_for_health
from app.config import Settings, reachable_url
from app.errors import UserError
from app.processes import OWNER_ENV, owner_marker

APP_PATH = Path(__file__).resolve().parent / "streamlit_app.py"
REPO_ROOT = APP_PATH.parent.parent


class UiStartError(UserError, RuntimeError):
    """The Streamlit server did not come up; the message says why and where its log is."""


def ui_environment(settings: Settings, api_url: str) -> dict[str, str]:
    """The AIPD_* variables that carry the resolved settings the page needs into its process."""
    from app.client import api_key_of

    values = {
        "API_URL": api_url,
        "API_KEY": api_key_of(settings),
        "RAY_DASHBOARD_URL": settings.ui.ray_dashboard_url,
        "MLFLOW_URL": settings.ui.mlflow_url,
        "GRAFANA_URL": settings.ui.grafana_url,
        "SCAN_DIR": settings.ui.scan_dir,
    }
    env = {f"AIPD_UI__{name}": value for name, value in values.items() if value}
    env["AIPD_SERVE__MAX_BATCH_FILES"] = str(settings.serve.max_batch_files)  # the page's batch chunk size
    return env


def streamlit_command(host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--browser.gatherUsageStats",
        "false",
    ]


def start_ui(
    settings: Settings, api_url: str, port: int, *, host: str | None = None, log_file: IO[str] | None = None
) -> subprocess.Popen:
    """Start `streamlit run ui/streamlit_app.py` headless; returns at once (see `wait_until_up`).

    Without `log_file` the server's output goes to this process's terminal.
    """
    env = dict(os.environ)
    for name in [name for name in env if name.startswith("AIPD_UI__")]:
        del env[name]  # the resolved settings below are the whole truth, not a stale variable of the parent
    env.update(ui_environment(settings, api_url))
    env[OWNER_ENV] = owner_marker()  # a page left by a killed command is found at the next start (app/processes.py)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        streamlit_command(host or settings.ui.host, port),
        env=env,
        cwd=REPO_ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file is not None else None,
    )


def wait_until_up(
    port: int, host: str = "127.0.0.1", timeout_s: float = 60.0, process: subprocess.Popen | None = None
) -> str:
    """Block until Streamlit's health route answers; returns the page's URL.

    Raises `UiStartError` when `process` exits first (a taken port, a broken install) or after `timeout_s`.
    """
    url = reachable_url(host, port)
    outcome = wait_for_health(f"{url}/_stcore/health", process, timeout_s)
    if outcome == "up":
        return url
    if outcome == "exited":
        assert process is not None
        raise UiStartError(
            f"the Streamlit server exited with code {process.returncode} before answering on {url} "
            "(is the port taken? its output above, or in the log file, says why)"
        )
    raise UiStartError(f"the Streamlit server did not answer on {url} within {timeout_s:.0f} s")


def stop_ui(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM (Streamlit shuts down cleanly on it), then SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout_s)
