"""Deploy a Serve application and wait for it within a bound.

`serve.run` waits forever when the cluster has no room for a replica (a GPU that is not there, CPUs another job
holds): the command hangs with nothing on the terminal. This waits the same way, but gives up after `timeout_s` with
Serve's own reason (which replicas wait, and for which resources), so a person sees what to change.
"""

from __future__ import annotations

import time
from typing import Any

from app.errors import UserError


class DeployError(UserError, RuntimeError):
    """The application failed to deploy, or was not running in time; the message says why in one line."""


def run_app(app: Any, name: str, timeout_s: float = 600.0, poll_s: float = 0.5) -> None:
    """Deploy `app` as `name` at "/" and return once it is RUNNING and the proxies route to it."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ApplicationStatus

    serve.run_many([serve.RunTarget(target=app, name=name, route_prefix="/")], wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(name)
        state = None if status is None else status.status
        if state == ApplicationStatus.RUNNING:
            break
        if state == ApplicationStatus.DEPLOY_FAILED:
            raise DeployError(f"the deployment of {name} failed: {_waiting_on(status)}")
        if time.monotonic() > deadline:
            raise DeployError(f"{name} was not running after {timeout_s:.0f} s: {_waiting_on(status)}")
        time.sleep(poll_s)
    # serve.run's last step too: the proxies know the new routes before the first request comes
    _get_global_client().wait_for_proxies_serving(wait_for_applications_running=True)


def _waiting_on(status: Any) -> str:
    """Serve's words for what holds an application up: each unhealthy deployment's message (its last line: a
    replica's exception, or the resources a replica waits for), else the application's own."""
    if status is None:
        return "Serve has no record of the application"
    reasons = [
        _last_line(overview.message) or f"{deployment} is {overview.status.value}"
        for deployment, overview in status.deployments.items()
        if overview.status != "HEALTHY"
    ]
    return "; ".join(reasons) or _last_line(status.message) or status.status.value


def _last_line(message: str | None) -> str:
    lines = (message or "").strip().splitlines()
    return lines[-1] if lines else ""
