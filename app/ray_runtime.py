"""Connecting to Ray: a local cluster on a laptop, or an existing one named by ``--address`` / ``RAY_ADDRESS``.

``node_environment`` is the one place that says what a Ray node this project starts carries in its environment:
Ray Serve reads its data-path switches once per process, in every process of the cluster (controller, proxies,
replicas), so they must be set where the node starts - here for a local cluster, in ``ray start``'s environment for
the others (cluster/local_cluster.py, docker-compose.yml, the KubeRay and launcher configs carry the same values).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from app.config import Settings
from app.errors import UserError
from app.ray_nodes import OwnedCluster, free_port, free_ports, port_free, start_owned_cluster

# HAProxy in front of every ingress replica, gRPC between deployments, user code on each replica's event loop.
HIGH_THROUGHPUT_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
DEFAULT_DASHBOARD_PORT = 8265  # Ray's own default, where a user looks first
START_LOCK_NAME = "aipd-ray-start.lock"  # in the temporary directory: shared by every command on the machine
# Ports Serve's HAProxy and fallback proxy take on every node; two clusters on one machine must not share them.
_PER_CLUSTER_PORTS = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


class ClusterUnavailableError(UserError, RuntimeError):
    """The named Ray cluster cannot be reached; the message says which address was tried."""


def node_environment(settings: Settings, *, local: bool, owned: bool = False) -> dict[str, str]:
    """The environment of a Ray node for these settings; ``local`` for clusters on this machine (laptop, tests).

    Every node trusts no client's X-Forwarded-For (uvicorn's `FORWARDED_ALLOW_IPS`): a rate limit per address must
    count the peer the proxy saw, not an address the client wrote (serving/guards.py). A local cluster also gets
    ports of its own for Serve's per-node proxies (so that a second cluster on the machine starts), HAProxy threads
    no more than the cores, and a short drain, so that stopping it takes seconds. An ``owned`` cluster (one that
    lives and dies with this command) carries this command's mark, so that what a `kill -9` of it leaves behind is
    found and stopped by the next start (app/processes.py).
    """
    env = dict(HIGH_THROUGHPUT_ENV) if settings.serve.high_throughput else {}
    env["FORWARDED_ALLOW_IPS"] = ""
    if local:
        ports = free_ports(len(_PER_CLUSTER_PORTS))
        env.update({name: str(port) for name, port in zip(_PER_CLUSTER_PORTS, ports, strict=True)})
        env["RAY_SERVE_HAPROXY_NBTHREAD"] = str(min(4, os.cpu_count() or 1))
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    if owned:
        from app.processes import OWNER_ENV, owner_marker

        env[OWNER_ENV] = owner_marker()
        # The command drains its service before it stops the node; Ray's own drain on SIGTERM would then only wait,
        # up to its timeout, for a GCS that is stopping too.
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    return env


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables for the processes started inside, then restore this process's own (Serve's client reads them
    at import, and a driver with the throughput switches on could not use a handle from synchronous code)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_local_cluster(
    settings: Settings, *, include_dashboard: bool, metrics_port: int | None = None
) -> OwnedCluster:
    """A local cluster that lives in a process session of its own and dies with this command (`OwnedCluster.stop`),
    with this process connected to it: what `aipd serve` and `aipd demo` run on, so that a supervisor's signal to
    their process group reaches them alone and they can drain before anything ends (app/ray_nodes.py)."""
    env = node_environment(settings, local=True, owned=True)
    cluster = start_owned_cluster(settings, env, include_dashboard=include_dashboard, metrics_port=metrics_port)
    api_server = f"http://127.0.0.1:{cluster.dashboard_port}" if cluster.dashboard_port else None
    joined = settings.model_copy(update={"ray_address": cluster.address})
    deadline = time.monotonic() + 60.0
    try:
        while True:
            try:
                init_ray(joined, api_server=api_server)
                return cluster
            except ClusterUnavailableError:  # its GCS listens before its raylet has registered
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)
    except BaseException:
        cluster.stop(grace_s=2.0)
        raise


def init_ray(settings: Settings, api_server: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's resources so callers can size their work.

    ``api_server``: the dashboard of the cluster joined, for the state API of its processes (see below)."""
    import ray

    from app.logging import route_library_logs

    if ray.is_initialized():
        return ray.cluster_resources()
    route_library_logs()  # ray.init's own messages ("Started a local Ray instance") go where the settings say
    address = settings.ray_address
    runtime_env = {"env_vars": {"AIPD_LOG_FORMAT": settings.log_format, "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    if api_server:
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = api_server
    kwargs.setdefault("log_to_driver", settings.verbose)  # workers' output stays in Ray's log files unless verbose
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, **kwargs)
        else:
            include_dashboard = kwargs.pop("include_dashboard", None)
            with _one_cluster_start_at_a_time(), _environment(node_environment(settings, local=True, owned=True)):
                if include_dashboard is not False:
                    # The cluster's own processes use its dashboard: without the address, Ray's state API in a
                    # worker finds the last cluster `ray start` made on this machine (its address file outlives
                    # it), and Ray Train's cleaner, which asks it whether a run's controller died, never frees a
                    # killed run's group.
                    port = kwargs.setdefault("dashboard_port", _dashboard_port())
                    runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
                ray.init(  # "local": always a new cluster, never a stray `ray start` found on this machine
                    address="local",
                    num_cpus=settings.local_num_cpus,
                    runtime_env=runtime_env,
                    include_dashboard=include_dashboard,
                    **kwargs,
                )
    except (ConnectionError, TimeoutError) as err:
        raise ClusterUnavailableError(f"cannot reach the Ray cluster at {address}: {err}") from err
    except RuntimeError as err:
        if address:
            raise ClusterUnavailableError(f"cannot reach the Ray cluster at {address}: {err}") from err
        raise
    import ray.data
    import ray.serve  # noqa: F401 - like ray.data, it attaches its own terminal handler on import: reroute both

    route_library_logs()
    if not settings.verbose:
        _cluster_messages_to_log()
    # Ray Data's progress tables belong to a verbose terminal; the commands show their own progress.
    ray.data.DataContext.get_current().enable_progress_bars = settings.verbose
    return ray.cluster_resources()


def _dashboard_port() -> int:
    return DEFAULT_DASHBOARD_PORT if port_free(DEFAULT_DASHBOARD_PORT) else free_port()


@contextlib.contextmanager
def _one_cluster_start_at_a_time() -> Iterator[None]:
    """Held from choosing the dashboard's port until ``ray.init`` returns (once the dashboard listens): two commands
    started together on one machine would otherwise both find Ray's default port free, and the second's dashboard
    would fail to bind while its workers asked the first cluster's dashboard about their own runs."""
    import fcntl
    import tempfile

    with open(Path(tempfile.gettempdir()) / START_LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cluster_messages_to_log() -> None:
    """Messages the cluster pushes to every driver (a raylet's "N worker processes have been started", a worker
    killed for memory) go to the log instead of straight to the terminal. A failure they explain still reaches the
    terminal as the error of the call that failed.

    Ray prints them from a thread of its own through a module function, with no logging hook: swapping that function
    is the only way, and it serves nothing else once workers' output stays off the terminal (`log_to_driver`).
    """
    import ray._private.worker as ray_worker

    from app.logging import get_logger

    log = get_logger("ray.cluster")

    def to_log(data: dict[str, Any], ignore_prefix: bool = False) -> None:
        for line in data.get("lines", []):
            log.warning("cluster_message", source=data.get("pid"), line=line)

    ray_worker.print_to_stdstream = to_log


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def sized_for_cluster(settings: Settings) -> Settings:
    """The settings with training sized for the device it will run on: `train.use_gpu`, or GPUs when the connected
    cluster has them (`TrainSettings.sized_for`)."""
    use_gpu = settings.train.use_gpu if settings.train.use_gpu is not None else cluster_has_gpus()
    return settings.model_copy(
        update={"train": settings.train.sized_for(use_gpu).model_copy(update={"use_gpu": use_gpu})}
    )


def dashboard_url() -> str | None:
    """host:port of the Ray dashboard of the cluster this process is connected to, when it runs one."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.worker import get_dashboard_url

        return get_dashboard_url() or None
    except Exception:  # noqa: BLE001 - the dashboard is optional; its absence is not an error
        return None
