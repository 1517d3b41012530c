"""A whole node dies during training: on a real two-node local cluster (`aipd cluster up --workers 1`), the worker
node's raylet is SIGKILLed while `aipd train` runs its two workers spread over both nodes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from app.ray_nodes import group_members
from cluster.local_cluster import alive_node_count, load_cluster
from tests.helpers import wait_until

pytestmark = pytest.mark.slow


def _aipd(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "aipd.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _raylet_of(node_group: int) -> int:
    """The raylet among the processes of a node started by `aipd cluster up` (each node is a process group)."""
    for pid in group_members(node_group):
        try:
            if b"/raylet/raylet" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no raylet in process group {node_group}")


def _first_checkpoint_registered(storage: Path) -> bool:
    """Ray Train has recorded the first epoch's checkpoint (its snapshot names it), so a restart resumes from it."""
    return any("epoch_000" in snapshot.read_text() for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"))


def test_a_node_killed_during_training_resumes_on_the_other_node(small_demo: Path, tmp_path: Path) -> None:
    """Fault: SIGKILL of the worker node's raylet (the node dies) during a 2-epoch run whose two Train workers are
    spread over the head and the worker node, once the first epoch's checkpoint is recorded.

    May be lost: the work of the epoch in progress. The run resumes from its last checkpoint on the remaining node,
    finishes, and registers one model.
    """
    env = {**os.environ, "AIPD_WORK_DIR": str(tmp_path), "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1"}
    up = _aipd("cluster", "up", "--workers", "1", "--cpus-per-node", "4", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    cluster = load_cluster(tmp_path)
    assert cluster is not None
    worker_node = next(node for node in cluster.nodes if node.role == "worker-0")
    train_env = {
        **env,
        "AIPD_TRAIN__PLACEMENT_STRATEGY": "SPREAD",
        "AIPD_TRAIN__CPUS_PER_WORKER": "1",
        "AIPD_TRAIN__MAX_FAILURES": "2",
    }
    command = [sys.executable, "-m", "aipd.cli", "train", "--address", cluster.address, "--data", str(small_demo),
               "--workers", "2", "--no-gpu", "--epochs", "2", "--batch-size", "8", "--image-size", "48"]  # fmt: skip
    store = f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    try:
        train = subprocess.Popen(command, env=train_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_until(
            lambda: train.poll() is not None or _first_checkpoint_registered(tmp_path / "ray_results"),
            400,
            interval_s=0.5,
            what="the first epoch's checkpoint",
        )
        assert train.poll() is None, "the run ended before the node could be killed: " + train.stdout.read()[-3000:]
        run = client.search_runs([client.get_experiment_by_name("aipd").experiment_id])[0]
        assert run.data.tags["train_nodes"] == "2", "the two workers run on two nodes"
        os.kill(_raylet_of(worker_node.pid), signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: alive_node_count(cluster.address) == 1, 120, interval_s=1.0, what="the node to be dead")
        detected_s = time.monotonic() - killed_at
        output, _ = train.communicate(timeout=600)
        finished_s = time.monotonic() - killed_at
    finally:
        _aipd("cluster", "down", env=env, timeout=120)
    assert train.returncode == 0, output[-4000:]
    assert "registered aipd-detector version 1 " in output, output[-2000:]
    versions = client.search_model_versions("name = 'aipd-detector'")
    assert len(versions) == 1, "one model registered, not one per attempt"
    run = client.get_run(versions[0].run_id)
    assert run.info.status == "FINISHED"
    assert client.get_metric_history(run.info.run_id, "resumed_from_epoch"), "the restarted workers loaded a checkpoint"
    assert run.data.metrics["epochs_run"] == 2
    assert run.data.tags["train_nodes"] == "1", "the resumed run ran on the remaining node"
    print(f"\nnode death: seen dead by the GCS after {detected_s:.1f} s, the run finished {finished_s:.1f} s after")
