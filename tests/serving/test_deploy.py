"""run_app against the session's real Serve instance: a deployment that cannot be placed, or whose replicas fail to
start, ends in one DeployError with Serve's reason instead of a wait without end."""

from __future__ import annotations

import time

import pytest

from serving.deploy import DeployError, run_app
from tests.helpers import undeploy

pytestmark = pytest.mark.slow


def test_a_replica_that_finds_no_room_gives_up_in_time_and_says_what_it_waits_for(serve_port: int) -> None:
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 512})
    class Greedy:
        def __call__(self, request) -> str:
            return "never"

    started = time.monotonic()
    try:
        with pytest.raises(DeployError, match=r"^unplaceable was not running after 3 s: .*Greedy"):
            run_app(Greedy.bind(), "unplaceable", timeout_s=3.0)
    finally:
        undeploy("unplaceable")
    assert time.monotonic() - started < 30.0


def test_a_replica_that_fails_to_start_ends_the_wait_with_its_error(serve_port: int) -> None:
    from ray import serve

    @serve.deployment
    class Broken:
        def __init__(self) -> None:
            raise ValueError("no model file at /nowhere/model.pt")

        def __call__(self, request) -> str:
            return "never"

    try:
        with pytest.raises(DeployError, match=r"^the deployment of broken failed: .*no model file at /nowhere"):
            run_app(Broken.bind(), "broken", timeout_s=120.0)
    finally:
        undeploy("broken")
