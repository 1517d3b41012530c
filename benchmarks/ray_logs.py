"""Ray Data's own logs of the datasets a benchmark executed, kept beside its results: per-operator resources over
time, backpressure changes and task launches say what held a pipeline below its ceiling."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_ray_data_logs(to: Path) -> None:
    """Copy the connected Ray session's ``logs/ray-data`` to ``to`` (no public call gives the session directory)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "ray-data"
    shutil.copytree(logs, to, dirs_exist_ok=True)
