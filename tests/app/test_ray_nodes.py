"""The ports a local Ray node is started with (each component its own, never one handed out twice), and the Ray
settings every process of the project starts with."""

import os
import subprocess
import sys

from app.ray_nodes import free_ports, node_ports


def test_ports_are_distinct_within_a_call_and_across_calls() -> None:
    first = free_ports(40)
    assert len(set(first)) == 40
    assert not set(first) & set(free_ports(40)), "a port given to one component is never given to another"


def test_a_nodes_components_get_ports_of_their_own() -> None:
    ports = node_ports([])
    single = [v for k, v in ports.items() if k not in ("min-worker-port", "max-worker-port")]
    assert len(set(single)) == len(single)


def test_the_project_defaults_turn_off_ray_datas_usage_poller() -> None:
    """Ray Data's own test of the setting: its poller thread, which outlives ray.shutdown() and then ends the
    process with status 1, does not start in a process with the project's defaults."""
    code = (
        "from app.ray_nodes import use_ray_defaults; use_ray_defaults()\n"
        "from ray.data._internal.usage.collector import usage_collection_disabled\n"
        "print(usage_collection_disabled())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr[-2000:]
