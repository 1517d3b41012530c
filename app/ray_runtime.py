"""Connecting to Ray: a local cluster on a laptop, or an existing one named by ``--address`` / ``RAY_ADDRESS``."""

from __future__ import annotations

from typing import Any

from app.config import Settings
from app.errors import UserError


class ClusterUnavailableError(UserError, RuntimeError):
    """The named Ray cluster cannot be reached; the message says which address was tried."""


def init_ray(settings: Settings, **kwargs: Any) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's resources so callers can size their work."""
    import ray

    if ray.is_initialized():
        return ray.cluster_resources()
    address = settings.ray_address
    runtime_env = {"env_vars": {"AIPD_LOG_FORMAT": settings.log_format, "PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **kwargs)
        else:
            ray.init(  # "local": always a new cluster, never a stray `ray start` found on this machine
                address="local",
                num_cpus=settings.local_num_cpus,
                runtime_env=runtime_env,
                include_dashboard=kwargs.pop("include_dashboard", None),
                **kwargs,
            )
    except (ConnectionError, TimeoutError) as err:
        raise ClusterUnavailableError(f"cannot reach the Ray cluster at {address}: {err}") from err
    except RuntimeError as err:
        if address:
            raise ClusterUnavailableError(f"cannot reach the Ray cluster at {address}: {err}") from err
        raise
    return ray.cluster_resources()


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


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
