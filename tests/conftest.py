"""Session-wide fixtures: one real local Ray cluster, its Serve instance on a free port, and a small demo set.

Each test module that deploys an application (a real ingress and a real detector) does so at "/" and deletes it at
the end (`tests.helpers.undeploy`), so only one application owns the root at a time.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.helpers import DEPLOY_TIMEOUT_S, ServeApp, free_port


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray with more logical CPUs than this machine's cores (Ray Data/Train deadlock on 2)."""
    import ray

    from app.config import Settings
    from app.ray_runtime import init_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not ray.is_initialized():  # started the way every `aipd` command starts a local cluster
        # with its dashboard: Ray Train's placement-group cleaner asks the state API (the dashboard) whether a
        # controller died, and without it the groups of a killed run stay reserved and starve later tests
        init_ray(Settings(ray_num_cpus=8), include_dashboard=True, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _no_placement_group_outlives_its_module(request: pytest.FixtureRequest):
    """No test module leaves the session cluster's CPUs reserved for the next: a run whose driver or controller died
    may leave its placement groups behind, and a later module's tasks or replicas would wait for them without end.
    They get a minute to go on their own; after that they are removed, with a warning that names the module."""
    yield
    if "ray" not in sys.modules:
        return
    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    def left() -> dict[str, str]:
        return {pg_id: info["name"] for pg_id, info in placement_group_table().items() if info["state"] != "REMOVED"}

    deadline = time.monotonic() + 60.0
    while left() and time.monotonic() < deadline:
        time.sleep(1.0)
    leaked = left()
    for pg_id in leaked:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
    if leaked:
        names = ", ".join(sorted(name or "unnamed" for name in leaked.values()))
        warnings.warn(f"{request.module.__name__} left {len(leaked)} placement groups reserved: {names}", stacklevel=1)


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.demo import build_demo_dataset

    out = tmp_path_factory.mktemp("demo") / "small"
    build_demo_dataset(out, images_per_class=64, size=64, seed=3)
    return out


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """The HTTP port of this cluster's Serve instance: started here on a free port unless another suite did."""
    from ray import serve
    from ray.serve.context import _get_global_client

    wanted = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": wanted})
    port = int(_get_global_client().http_config.port)
    yield port
    if port == wanted:
        serve.shutdown()


@pytest.fixture(scope="session")
def deploy(serve_port: int) -> Callable[..., ServeApp]:
    """deploy(name, settings, args) -> ServeApp, at "/"; the module that deploys calls undeploy(name) when done."""
    from serving.app_builder import build_application
    from serving.deploy import run_app

    def _deploy(name: str, settings: Any, args: Any = None) -> ServeApp:
        run_app(build_application(settings, args), name, timeout_s=DEPLOY_TIMEOUT_S)
        return ServeApp(name, serve_port)

    return _deploy
