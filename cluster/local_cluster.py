"""A real multi-node Ray cluster on one machine: a head and N worker nodes, each with its own ports.

Each node is a ``ray start --block`` in its own process session, so ``down`` can end exactly the processes this
cluster started (``ray stop`` would also kill any other Ray on the machine). The state (addresses, ports and process
groups) is kept in a JSON file in the work directory. Token auth is Ray's default: every node and client reads the
token from ``~/.ray/auth_token`` with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.config import Settings
from app.errors import UserError
from app.ray_runtime import free_port as _free_port
from app.ray_runtime import node_environment, port_free

WORKER_PORT_SPAN = 200


class LocalClusterError(UserError, RuntimeError):
    """The local cluster could not be started or found; the message says what happened and where the log is."""


@dataclass
class NodeProcess:
    role: str
    pid: int
    log: str
    ports: dict[str, int]


@dataclass
class LocalCluster:
    address: str
    dashboard_url: str | None
    state_file: str
    nodes: list[NodeProcess] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _free_range(span: int) -> int:
    """The start of ``span`` consecutive ports that are free now (for a raylet's worker processes)."""
    for base in range(30000, 60000 - span, span):
        if all(port_free(port) for port in (base, base + span // 2, base + span - 1)):
            return base
    raise LocalClusterError("no free port range for Ray workers")


def _ray_binary() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **(extra or {})}
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def _node_env(settings: Settings) -> dict[str, str]:
    """What each node of the cluster starts with: the project's node environment, with ports of its own, and the
    HTTP port shared by the nodes' proxies (they all run on this one machine)."""
    return {**node_environment(settings, local=True), "SERVE_SOCKET_REUSE_PORT_ENABLED": "1"}


def _ensure_auth_token() -> None:
    """`ray start` refuses to run with token auth and no token (`ray.init` makes one on a fresh machine)."""
    subprocess.run(
        [_ray_binary(), "get-auth-token", "--generate"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


def _node_ports(used_bases: list[int]) -> dict[str, int]:
    base = _free_range(WORKER_PORT_SPAN)
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
    ports = {name: _free_port() for name in names}
    ports["min-worker-port"] = base
    ports["max-worker-port"] = base + WORKER_PORT_SPAN - 1
    return ports


def _start_node(args: list[str], log_path: Path, env: dict[str, str]) -> int:
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, which outlives this function
    process = subprocess.Popen(
        [_ray_binary(), "start", "--block", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(env),
        start_new_session=True,
    )
    return process.pid


def cluster_up(
    work_dir: Path,
    workers: int = 1,
    cpus_per_node: int = 4,
    timeout_s: float = 120.0,
    settings: Settings | None = None,
) -> LocalCluster:
    """Start a head and ``workers`` worker nodes and wait until all of them are alive."""
    settings = settings or Settings()
    state_dir = work_dir.resolve() / "cluster"
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "state.json"
    if state_file.exists():
        raise LocalClusterError(f"a local cluster is already recorded in {state_file}; run `aipd cluster down` first")
    _ensure_auth_token()
    used: list[int] = []
    head_ports = _node_ports(used)
    gcs_port, dashboard_port, client_port = _free_port(), _free_port(), _free_port()
    head_args = [
        "--head",
        f"--port={gcs_port}",
        f"--num-cpus={cpus_per_node}",
        f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client_port}",
    ]
    head_args += [f"--{k}={v}" for k, v in head_ports.items()]
    nodes = [
        NodeProcess(
            "head",
            _start_node(head_args, state_dir / "head.log", _node_env(settings)),
            str(state_dir / "head.log"),
            {**head_ports, "gcs": gcs_port, "dashboard": dashboard_port, "client": client_port},
        )
    ]
    address = f"127.0.0.1:{gcs_port}"
    cluster = LocalCluster(address, f"http://127.0.0.1:{dashboard_port}", str(state_file), nodes)
    _save(cluster)
    try:
        _wait_for_nodes(address, 1, timeout_s, state_dir / "head.log")
        for i in range(workers):
            ports = _node_ports(used)
            log = state_dir / f"worker-{i}.log"
            args = [f"--address={address}", f"--num-cpus={cpus_per_node}"] + [f"--{k}={v}" for k, v in ports.items()]
            pid = _start_node(args, log, _node_env(settings))
            cluster.nodes.append(NodeProcess(f"worker-{i}", pid, str(log), ports))
            _save(cluster)
        _wait_for_nodes(address, 1 + workers, timeout_s, state_dir / "worker-0.log")
    except Exception:
        cluster_down(work_dir)
        raise
    return cluster


def _wait_for_nodes(address: str, count: int, timeout_s: float, log: Path) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if alive_node_count(address) >= count:
            return
        time.sleep(1.0)
    raise LocalClusterError(f"{count} Ray node(s) did not come up at {address} in {timeout_s:.0f} s; see {log}")


def alive_node_count(address: str) -> int:
    """Alive nodes according to the GCS, asked from a subprocess so this process's own Ray is untouched."""
    code = (
        "import ray, sys\n"
        "ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR')\n"
        "print(sum(1 for n in ray.nodes() if n['Alive']))\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, address], capture_output=True, text=True, env=_env(), timeout=60
        )
    except subprocess.TimeoutExpired:
        return 0
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]) if out.returncode == 0 and lines and lines[-1].isdigit() else 0


def _save(cluster: LocalCluster) -> None:
    Path(cluster.state_file).write_text(json.dumps(cluster.to_dict(), indent=2))


def load_cluster(work_dir: Path) -> LocalCluster | None:
    state_file = work_dir.resolve() / "cluster" / "state.json"
    if not state_file.exists():
        return None
    data = json.loads(state_file.read_text())
    data["nodes"] = [NodeProcess(**n) for n in data["nodes"]]
    return LocalCluster(**data)


def cluster_down(work_dir: Path, grace_s: float = 15.0) -> list[int]:
    """End every process of every node this cluster started (workers first), and nothing else."""
    cluster = load_cluster(work_dir)
    if cluster is None:
        return []
    groups = [n.pid for n in reversed(cluster.nodes)]
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.5)
    for pgid in groups:
        _signal_group(pgid, signal.SIGKILL)
    deadline = time.time() + 10
    while time.time() < deadline and any(group_members(g) for g in groups):
        time.sleep(0.2)
    Path(cluster.state_file).unlink(missing_ok=True)
    return groups


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(entry.name))
    return members
