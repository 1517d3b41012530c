"""The Serve application: an ingress bound to a detector, built from settings.

`build_app` is the application builder named by `serving/serve_config.yaml` (`import_path:
serving.app_builder:build_app`); Serve calls it with the file's `args`, where the application is deployed, so API
keys and GPUs are those of the cluster, not of the machine that wrote the file. `build_application` is the same from
Python, for `aipd serve`, the tests and the benchmark.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from app.config import Settings, load_settings
from serving.config import (
    AppArgs,
    colocated_options,
    detector_gpus,
    detector_options,
    ingress_options,
    resolved,
)


def build_app(args: dict[str, Any]) -> Application:
    parsed = AppArgs(**(args or {}))
    settings = load_settings(parsed.config_file, **parsed.settings)
    return build_application(settings, parsed)


def build_application(settings: Settings, args: AppArgs | None = None, num_gpus: float | None = None) -> Application:
    """The application for these settings: two deployments (split layout) or one (colocated, see serve.layout)."""
    from serving.detector import DetectorDeployment
    from serving.ingress import IngressDeployment

    args = args or AppArgs()
    gpus = detector_gpus(settings) if num_gpus is None else num_gpus
    settings = resolved(settings, gpus)
    payload = settings.model_dump(mode="json")
    if settings.serve.layout == "colocated":
        return IngressDeployment.options(**colocated_options(settings, args, gpus)).bind(None, payload)
    detector = DetectorDeployment.options(**detector_options(settings, args, gpus)).bind(payload)
    return IngressDeployment.options(**ingress_options(settings, args)).bind(detector, payload)
