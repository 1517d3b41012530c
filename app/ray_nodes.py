"""Ray nodes started as `ray start --block` processes, each in a process session of its own.

Why a session of its own: a supervisor that stops a command signals its whole process group (so does a terminal that
closes), and Ray's processes in that group would die at once, mid-request, before the command could drain its
service. A node in its own session hears only the command that owns it, which stops it last, after the requests in
flight were answered. `aipd serve` and `aipd demo` run their local cluster this way (`OwnedCluster`); `aipd cluster
up` starts its nodes with the same helpers and keeps their process groups in a state file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import Settings
from app.errors import UserError

WORKER_PORT_SPAN = 200  # worker ports of one raylet; two clusters on one machine must not share a range


class NodeStartError(UserError, RuntimeError):
    """A Ray node did not come up; the message says where its log is."""


def ray_binary() -> str:
    return str(Path(sys.executable).with_name("ray"))


# Ray's settings in every process of this project, below the user's own environment. Token auth: every node this
# project starts speaks it. No Ray Data usage poller: its thread outlives ray.shutdown(), and its next poll touches
# the shut-down core worker, which ends the process with exit status 1 before the command has stopped what it started.
RAY_DEFAULTS = {"RAY_AUTH_MODE": "token", "RAY_DATA_USAGE_DISABLED": "1"}


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a `ray` command, with the project's Ray defaults and ``extra``."""
    return {**RAY_DEFAULTS, **os.environ, **(extra or {})}


def use_ray_defaults() -> None:
    """The project's Ray defaults in this process. Ray reads them once, when it is first imported, so the command's
    entry point calls this before anything imports Ray."""
    for name, value in RAY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def ensure_auth_token() -> None:
    """`ray start` refuses to run with token auth and no token (`ray.init` makes one on a fresh machine). Asking
    `ray get-auth-token` costs a Python start and Ray's import, so a token already where Ray looks is taken as is."""
    if _auth_token_present():
        return
    subprocess.run(
        [ray_binary(), "get-auth-token", "--generate"],
        env=ray_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


def _auth_token_present() -> bool:
    """Ray's token sources, in its order: the RAY_AUTH_TOKEN variable, the file RAY_AUTH_TOKEN_PATH names, else
    ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return True
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


_handed_out: set[int] = set()  # ports this process gave to Ray's components: never handed out twice


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports, free now and not handed out before by this process. The kernel gives a port that
    was bound and let go to the next asker again, and two of a node's components on one port stop it from starting
    ("... is trying to use a port number that is used by other components"), so all are bound at once."""
    found: list[int] = []
    with contextlib.ExitStack() as held:
        while len(found) < count:
            sock = held.enter_context(socket.socket())
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            if port not in _handed_out:
                found.append(port)
    _handed_out.update(found)
    return found


def free_port() -> int:
    return free_ports(1)[0]


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_range(span: int) -> int:
    """The start of ``span`` consecutive ports that are free now (for a raylet's worker processes)."""
    for base in range(30000, 60000 - span, span):
        if all(port_free(port) for port in (base, base + span // 2, base + span - 1)):
            return base
    raise NodeStartError("no free port range for Ray workers")


def node_ports(used_bases: list[int]) -> dict[str, int]:
    """Ports of their own for one node's raylet, object manager, agents and workers (`ray start` flag names)."""
    base = free_range(WORKER_PORT_SPAN)
    while base in used_bases:
        base += WORKER_PORT_SPAN
    used_bases.append(base)
    names = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ports["min-worker-port"] = base
    ports["max-worker-port"] = base + WORKER_PORT_SPAN - 1
    return ports


def start_node(args: list[str], log_path: Path, env: dict[str, str]) -> int:
    """`ray start --block ARGS` in a new session (its pid is its process group's id), output to ``log_path``."""
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, which outlives this function
    process = subprocess.Popen(
        [ray_binary(), "start", "--block", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=ray_env(env),
        start_new_session=True,
    )
    return process.pid


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: state, parent, process group, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a raylet's parent, `ray start --block`, reaps it only once a second)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


RAYLET_FIRST_S = 5.0


def stop_groups(groups: list[int], grace_s: float = 15.0) -> None:
    """SIGTERM to the groups' raylets, then to every group; SIGKILL to what still runs after ``grace_s``, and wait
    for the ends. Raylets first, as `ray stop` does: a raylet that stops unregisters from the GCS and waits for the
    answer, which a GCS stopping at the same moment never sends: the raylet would wait out the whole grace."""
    raylets = [pid for pgid in groups for pid in group_members(pgid) if _command_name(pid) == "raylet"]
    for pid in raylets:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + min(grace_s, RAYLET_FIRST_S)
    while time.monotonic() < deadline and any(_running(pid) for pid in raylets):
        time.sleep(0.1)
    for pgid in groups:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.2)
    for pgid in groups:
        signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.2)


@dataclass
class OwnedCluster:
    """A single-node local cluster that only the command that started it stops (`stop`, last of all)."""

    address: str
    pgid: int
    log: Path
    dashboard_port: int | None

    def stop(self, grace_s: float = 10.0) -> None:
        """End the head's session, then whatever of the cluster lives in other groups (Serve's HAProxy, the
        workers Ray gives process groups of their own): they all carry this command's mark."""
        from app.processes import owned_processes, stop

        stop_groups([self.pgid], grace_s)
        stop(owned_processes(), timeout_s=grace_s)


def start_owned_cluster(
    settings: Settings, env: dict[str, str], *, include_dashboard: bool, metrics_port: int | None = None
) -> OwnedCluster:
    """Start a head node in its own session with ``env`` (the node environment) and wait until it takes drivers."""
    ensure_auth_token()
    log_dir = settings.log_file.parent.resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "ray-head.log"
    gcs_port, dashboard_port, client_port = free_ports(3)
    dashboard_port = dashboard_port if include_dashboard else None
    args = [
        "--head",
        f"--port={gcs_port}",
        f"--num-cpus={settings.local_num_cpus}",
        f"--include-dashboard={'true' if include_dashboard else 'false'}",
        *(["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"] if dashboard_port else []),
        f"--ray-client-server-port={client_port}",
        *(f"--{k}={v}" for k, v in node_ports([]).items() if k != "metrics-export-port" or not metrics_port),
        *([f"--metrics-export-port={metrics_port}"] if metrics_port else []),
    ]
    pgid = start_node(args, log, env)
    cluster = OwnedCluster(f"127.0.0.1:{gcs_port}", pgid, log, dashboard_port)
    deadline = time.monotonic() + 90.0
    while not _listening(gcs_port):
        if not group_members(pgid) or time.monotonic() > deadline:
            cluster.stop(grace_s=2.0)
            raise NodeStartError(f"the local Ray cluster did not start; see {log}")
        time.sleep(0.2)
    return cluster


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
