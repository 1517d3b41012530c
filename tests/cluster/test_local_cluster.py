"""A real two-node Ray cluster on this machine: `aipd cluster up`, a training run spread over both nodes,
and `aipd cluster down` leaving no process behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from app.processes import cluster_processes
from cluster.local_cluster import alive_node_count, load_cluster

pytestmark = pytest.mark.slow


def _aipd(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aipd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_two_node_cluster_trains_across_both_nodes_and_stops_cleanly(small_demo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "AIPD_WORK_DIR": str(tmp_path), "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    up = _aipd("cluster", "up", "--workers", "1", "--cpus-per-node", "4", env=env, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = load_cluster(tmp_path)
    assert cluster is not None
    try:
        assert alive_node_count(cluster.address) == 2
        train = _aipd(
            "train",
            "--address",
            cluster.address,
            "--data",
            str(small_demo),
            "--workers",
            "2",
            "--no-gpu",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--image-size",
            "48",
            env={**env, "AIPD_TRAIN__PLACEMENT_STRATEGY": "STRICT_SPREAD", "AIPD_TRAIN__CPUS_PER_WORKER": "1"},
        )
        assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
        assert "registered aipd-detector version 1" in train.stdout
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
        run = client.search_runs([client.get_experiment_by_name("aipd").experiment_id])[0]
        assert run.data.tags["train_nodes"] == "2", "the two workers ran on two different nodes"
    finally:
        down = _aipd("cluster", "down", env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "stopped 2 node(s)" in down.stdout
    assert not [
        p for n in cluster.nodes for p in _processes_mentioning(f"--node_manager_port={n.ports['node-manager-port']}")
    ]
    assert not cluster_processes(cluster.state_file), "every process of the cluster ended, whatever its group"
    assert load_cluster(tmp_path) is None
