"""The processes a command leaves behind when it is killed outright, found and named at the next start.

A `kill -9` (an OOM kill, a supervisor out of patience) gives a command no chance to stop what it started: Ray's
agents and Serve's HAProxy outlive it, the HAProxy keeps the service's port and answers 500 to every request. Every
local Ray cluster a command owns carries that command's identity in its environment (``OWNER_ENV``: its pid and start
time), which every process of the cluster inherits, HAProxy included. A process that carries it while its owner is
gone is provably a leftover of this project and is stopped; anything else that holds a port is only named, with its
pid and command, because it is not ours to stop.

A cluster that outlives the command that started it (`aipd cluster up`) carries ``CLUSTER_ENV`` instead: its own
state file, which `aipd cluster down` reads to end every process of it, whatever their process group.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import psutil

OWNER_ENV = "AIPD_OWNER"
CLUSTER_ENV = "AIPD_CLUSTER"


@dataclass(frozen=True)
class Holder:
    """Who listens on a port: its pid and command line, and whether it is a leftover of this project."""

    pid: int
    command: str
    leftover: bool


def owner_marker(pid: int | None = None) -> str:
    """The identity a command gives the cluster it owns: pid and start time (a recycled pid is not the owner)."""
    process = psutil.Process(pid or os.getpid())
    return f"{process.pid}:{process.create_time():.2f}"


def owner_alive(marker: str) -> bool:
    try:
        return owner_marker(int(marker.split(":", 1)[0])) == marker
    except (ValueError, psutil.Error):
        return False


def _marked(variable: str = OWNER_ENV) -> list[tuple[psutil.Process, str]]:
    """Every other process that carries a mark in ``variable``, with the mark."""
    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        try:
            marker = process.environ().get(variable)
        except (psutil.Error, OSError):
            continue  # gone, a zombie, or not ours to read
        if marker:
            found.append((process, marker))
    return found


def leftovers() -> list[psutil.Process]:
    """Processes of a local cluster whose owning command is gone."""
    return [process for process, marker in _marked() if not owner_alive(marker)]


def owned_processes() -> list[psutil.Process]:
    """The processes of this command's own cluster, whatever their process group."""
    mine = owner_marker()
    return [process for process, marker in _marked() if marker == mine]


def cluster_processes(cluster: str) -> list[psutil.Process]:
    """The processes of the local cluster marked ``cluster``: its nodes, the workers Ray puts in process groups of
    their own, and Serve's HAProxy, which outlives its proxy when the node is stopped."""
    return [process for process, marker in _marked(CLUSTER_ENV) if marker == cluster]


def stop(processes: list[psutil.Process], timeout_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL for what still runs after ``timeout_s``; the pids that were stopped."""
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(alive, timeout=timeout_s)
    return [process.pid for process in processes]


def port_holder(port: int) -> Holder | None:
    """The process listening on a TCP port of this machine, if any can be seen."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for connection in connections:
        if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port:
            if connection.pid is None:
                return Holder(0, "a process this user cannot see", False)
            try:
                process = psutil.Process(connection.pid)
                command = " ".join(process.cmdline()) or process.name()
                marker = process.environ().get(OWNER_ENV)
            except (psutil.Error, OSError):
                return Holder(connection.pid, "a process that just ended", False)
            return Holder(connection.pid, command[:200], bool(marker) and not owner_alive(marker))
    return None


def wait_port_free(port: int, timeout_s: float) -> bool:
    """Until nothing listens on ``port`` (a stopped HAProxy lets go of it within a moment)."""
    deadline = time.monotonic() + timeout_s
    while port_holder(port) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
