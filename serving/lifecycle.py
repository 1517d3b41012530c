"""Starting and stopping the service as an operator needs it: a port that is taken is named before anything starts,
what an earlier killed run left behind is cleared, and a stop drains before it ends anything.

A stop, on Ctrl-C or a supervisor's SIGTERM: every replica hears through the application's shared state
(serving/metrics.py) that it is draining, so `/health` turns 503 and new predictions get a 503 with Retry-After while
the requests in flight are answered; once the ingress replicas report none left (or the drain's time is up), Serve is
shut down. The command then ends the cluster it started (app/ray_nodes.py) and anything of it still running.
"""

from __future__ import annotations

import time

from app.errors import UserError
from app.logging import get_logger

DRAIN_S = 10.0  # longest a stop waits for the requests in flight; the whole stop stays well within 30 s

log = get_logger("serving.lifecycle")


class PortTakenError(UserError, RuntimeError):
    """The service's port is held by a process that is not this project's leftover; the message names it."""


def clear_leftovers() -> list[str]:
    """Stop what killed earlier runs left behind (provably ours: their owner is gone); one line per process."""
    from app.processes import leftovers, stop

    found = leftovers()
    lines = []
    for process in found:
        try:
            name = process.name()
        except Exception:  # noqa: BLE001 - a leftover that ended meanwhile
            name = "process"
        lines.append(f"stopped {name} (pid {process.pid}), left running by an earlier aipd command that was killed")
    stop(found)
    return lines


def require_free_port(host: str, port: int) -> None:
    """One line naming the port and who holds it, before a cluster is started for nothing."""
    from app.processes import port_holder, wait_port_free

    holder = port_holder(port)
    if holder is None or wait_port_free(port, timeout_s=3.0):  # a stopped leftover lets go within a moment
        return
    raise PortTakenError(
        f"port {port} is taken by pid {holder.pid} ({holder.command}); stop it, or serve on another port with "
        f"--port (AIPD_SERVE__PORT) - {host}:{port} cannot be served twice"
    )


def drain_and_stop(app_name: str, drain_s: float = DRAIN_S) -> None:
    """Drain the application (every replica answers 503 to new work), wait for the requests in flight, shut Serve
    down, and forget the application's totals."""
    import ray
    from ray import serve

    from serving.metrics import FLUSH_INTERVAL_S, drop_store, get_store

    started = time.monotonic()
    try:
        store = get_store(app_name)
        ray.get(store.drain.remote(), timeout=5.0)
        time.sleep(2 * FLUSH_INTERVAL_S)  # every replica hears of it at its next flush
        left = ray.get(store.in_flight.remote(), timeout=5.0)
        while left > 0 and time.monotonic() - started < drain_s:
            time.sleep(0.2)
            left = ray.get(store.in_flight.remote(), timeout=5.0)
        log.info("service drained", in_flight_left=left, seconds=round(time.monotonic() - started, 1))
    except Exception as err:  # noqa: BLE001 - a cluster already going away: nothing left to drain
        log.warning("could not drain the service", error=str(err))
    try:
        serve.shutdown()
    finally:
        drop_store(app_name)
