"""Two commands that each start a local Ray cluster at the same moment on one machine (two seeds of a benchmark, two
terminals): each gets a dashboard of its own, and each cluster's processes are pointed at their own dashboard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Starts a private cluster the way every `aipd` command does, then reports where its dashboard is and which
# dashboard its workers would ask (the address init_ray hands them).
CHILD = """
import json, os
from app.config import Settings
from app.ray_runtime import dashboard_url, init_ray
import ray

init_ray(Settings(ray_num_cpus=2), log_to_driver=False)
env = ray.get(ray.remote(lambda: os.environ.get("RAY_API_SERVER_ADDRESS")).options(num_cpus=0).remote())
print(json.dumps({"dashboard": dashboard_url(), "workers_ask": env}), flush=True)
ray.shutdown()
"""


def test_clusters_started_together_each_get_their_own_dashboard(tmp_path: Path) -> None:
    env = {**os.environ, "AIPD_WORK_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    reports = []
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err[-2000:]
        assert "Failed to start the dashboard" not in err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    ports = [report["dashboard"].rsplit(":", 1)[1] for report in reports]
    assert ports[0] != ports[1], reports
    for report, port in zip(reports, ports, strict=True):
        assert report["workers_ask"] == f"http://127.0.0.1:{port}"
