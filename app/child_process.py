"""Servers the CLI starts as child processes (the MLflow server, the Streamlit page): wait until one answers."""

from __future__ import annotations

import subprocess
import time
from typing import Literal

import httpx


def wait_for_health(
    health_url: str, process: subprocess.Popen | None, timeout_s: float, interval_s: float = 0.25
) -> Literal["up", "exited", "timeout"]:
    """Poll ``health_url`` until it answers 200 ("up"), ``process`` exits first ("exited") or time runs out; the
    caller turns the last two into its own error, which knows where that server's log is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return "exited"
        try:
            if httpx.get(health_url, timeout=2.0).status_code == 200:
                return "up"
        except httpx.TransportError:
            pass
        time.sleep(interval_s)
    return "timeout"
