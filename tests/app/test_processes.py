"""Leftovers of a killed command: real processes that carry a dead owner's mark are found and stopped; a process
whose owner lives, or that carries no mark, is left alone; a port's holder is named."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil

from app.processes import OWNER_ENV, leftovers, owner_alive, owner_marker, port_holder, stop
from tests.helpers import free_port

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _dead_marker() -> str:
    """The mark of a command that has exited (a real pid, gone)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{done.stdout.strip()}:12345.00"


def _spawn(marker: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    if marker is not None:
        env[OWNER_ENV] = marker
    process = subprocess.Popen(SLEEPER, env=env)
    time.sleep(0.3)  # its environment is readable once it runs
    return process


def test_the_marks_of_this_process_and_of_a_gone_one() -> None:
    assert owner_alive(owner_marker())
    assert not owner_alive(_dead_marker())
    assert not owner_alive("not-a-marker")


def test_a_process_of_a_dead_owner_is_a_leftover_and_is_stopped() -> None:
    orphan, owned, unmarked = _spawn(_dead_marker()), _spawn(owner_marker()), _spawn(None)
    try:
        found = {process.pid for process in leftovers()}
        assert orphan.pid in found
        assert owned.pid not in found and unmarked.pid not in found
        stopped = stop([psutil.Process(orphan.pid)], timeout_s=5.0)
        assert stopped == [orphan.pid] and orphan.wait(timeout=10) is not None
    finally:
        for process in (orphan, owned, unmarked):
            process.kill()
            process.wait(timeout=10)


def test_the_holder_of_a_port_is_named() -> None:
    port = free_port()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen()
        holder = port_holder(port)
        assert holder is not None and holder.pid == os.getpid() and "pytest" in holder.command
        assert not holder.leftover
    assert port_holder(port) is None
