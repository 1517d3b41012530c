"""Leftovers of a killed command: real processes that carry a dead owner's mark are found and stopped; a process
whose owner lives, or that carries no mark, is left alone; a local cluster's processes are found by its mark; a
port's holder is named."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil

from app.processes import (
    CLUSTER_ENV,
    OWNER_ENV,
    cluster_processes,
    leftovers,
    owner_alive,
    owner_marker,
    port_holder,
    stop,
)
from tests.helpers import free_port

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _dead_marker() -> str:
    """The mark of a command that has exited (a real pid, gone)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return f"{done.stdout.strip()}:12345.00"


def _spawn(marker: str | None, variable: str = OWNER_ENV) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in (OWNER_ENV, CLUSTER_ENV)}
    if marker is not None:
        env[variable] = marker
    process = subprocess.Popen(SLEEPER, env=env, start_new_session=True)
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


def test_a_clusters_processes_are_found_by_its_mark_in_any_process_group(tmp_path) -> None:
    """What `aipd cluster down` ends after the nodes' groups: Serve's HAProxy lives in a session of its own."""
    ours, other = str(tmp_path / "a" / "state.json"), str(tmp_path / "b" / "state.json")
    mine, theirs, owned = _spawn(ours, CLUSTER_ENV), _spawn(other, CLUSTER_ENV), _spawn(owner_marker())
    try:
        assert [process.pid for process in cluster_processes(ours)] == [mine.pid]
        stop(cluster_processes(ours), timeout_s=5.0)
        assert mine.wait(timeout=10) is not None
        assert theirs.poll() is None and owned.poll() is None
        assert mine.pid not in {process.pid for process in leftovers()}, "a cluster's mark is not an owner's"
    finally:
        for process in (mine, theirs, owned):
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
