"""A real multi-node Ray cluster on one machine: a head and N worker nodes, each with its own ports.

Each node is a ``ray start --block`` in its own process session, so ``down`` can end exactly the processes this
cluster started (``ray stop`` would also kill any other Ray on the machine). The state (addresses, ports and process
groups) is kept in a JSON file in the work directory. Token auth is Ray's default: every node and client reads the
token from ``~/.ray/auth_token`` with ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from app.config import Settings
from app.errors import UserError
from app.processes import CLUSTER_ENV, cluster_processes, stop
from app.ray_nodes import ensure_auth_token, free_ports, node_ports, ray_env, start_node, stop_groups
from app.ray_runtime import node_environment


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


def _node_env(settings: Settings, state_file: Path) -> dict[str, str]:
    """What each node of the cluster starts with: the project's node environment, with ports of its own, and the
    HTTP port shared by the nodes' proxies (they all run on this one machine). Not owned (the cluster outlives the
    `aipd cluster up` that started it) but marked with its state file, so `down` finds every process it started."""
    return {
        **node_environment(settings, local=True),
        "SERVE_SOCKET_REUSE_PORT_ENABLED": "1",
        CLUSTER_ENV: str(state_file),
    }


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
    ensure_auth_token()
    used: list[int] = []
    head_ports = node_ports(used)
    gcs_port, dashboard_port, client_port = free_ports(3)
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
            start_node(head_args, state_dir / "head.log", _node_env(settings, state_file)),
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
            ports = node_ports(used)
            log = state_dir / f"worker-{i}.log"
            args = [f"--address={address}", f"--num-cpus={cpus_per_node}"] + [f"--{k}={v}" for k, v in ports.items()]
            pid = start_node(args, log, _node_env(settings, state_file))
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
            [sys.executable, "-c", code, address], capture_output=True, text=True, env=ray_env(), timeout=60
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
    stop_groups(groups, grace_s)
    stop(cluster_processes(cluster.state_file), timeout_s=grace_s)
    Path(cluster.state_file).unlink(missing_ok=True)
    return groups
