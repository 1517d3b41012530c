"""Session-wide fixtures: one real local Ray cluster for every test that needs Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with more logical CPUs than this machine's cores (Ray Data/Train deadlock on 2)."""
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.demo import build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "small"
    build_demo_dataset(out, images_per_class=64, size=64, seed=3)
    return out
