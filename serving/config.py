"""Deployment options from `Settings`, and the standard Ray Serve config file made from them.

`aipd serve` writes the file (`serving/serve_config.yaml` in the repository is one, made from the defaults), and the
same file works with Ray's own tools: `serve run serving/serve_config.yaml` on a laptop, `serve deploy` against a
cluster. It names the application builder (`serving.app_builder:build_app`) with its `args` - the serving settings -
and lists both deployments with their autoscaling bounds, so an operator can change replicas, batch size or the model
URI in the file and `serve deploy` it: the detector's `user_config` changes apply live, without restarting replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

from app.config import Settings

APP_NAME = "aipd"
BUILDER = "serving.app_builder:build_app"
INGRESS = "IngressDeployment"
DETECTOR = "DetectorDeployment"
INGRESS_MAX_ONGOING = 256  # the ingress mostly waits on the detector; it needs many requests in flight, not CPUs
DETECTOR_MIN_ONGOING = 256  # see detector_options

# What a GPU cluster's defaults are sized to (sized_for_node; benchmarks/RESULTS.md has the measurements).
GPU_MAX_BATCH_SIZE = 64
GPU_MAX_INGRESS_REPLICAS = 32

# OpenMP threads that finish an operator spin before sleeping (libgomp spins 300,000 rounds by default); on a CPU node
# the proxy and the ingress need those cores between the operators of a forward pass (benchmarks/RESULTS.md).
DETECTOR_ENV = {"GOMP_SPINCOUNT": "1000", "KMP_BLOCKTIME": "1"}
# The detector looks at the registry again at every poll, so a call that fails in seconds beats MLflow's default of
# retrying for minutes, during which the replica can neither pick up a champion nor tell that the registry is gone.
REGISTRY_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# Settings sections the replicas use; the rest (train, tune, data) stays out of the file.
SERVING_FIELDS = (
    "work_dir",
    "log_format",
    "log_level",
    "mlflow_tracking_uri",
    "mlflow_experiment",
    "registered_model",
    "champion_alias",
    "challenger_alias",
    "images",
    "serve",
)


class AppArgs(BaseModel):
    """The `args` of the application builder, as written under `applications[0].args` in the config file.

    API keys are never written here: the builder reads them from `AIPD_API_KEYS` where it runs (on the cluster).
    """

    config_file: str | None = Field(None, description="an aipd settings YAML read where the builder runs")
    settings: dict[str, Any] = Field(default_factory=dict, description="settings overrides, same shape as Settings")
    autoscaling: dict[str, Any] = Field(
        default_factory=lambda: {"upscale_delay_s": 10.0, "downscale_delay_s": 120.0},
        description="extra AutoscalingConfig fields for both deployments (delays, look_back_period_s, ...)",
    )


def portable_settings(settings: Settings) -> dict[str, Any]:
    """The serving part of the settings as plain values (no secrets), for `args.settings`."""
    dumped = settings.model_dump(mode="json", include=set(SERVING_FIELDS))
    return {key: dumped[key] for key in SERVING_FIELDS}


def detector_user_config(settings: Settings) -> dict[str, Any]:
    """The detector's live settings (`ServeSettings.detector`), with the model reference resolved."""
    return settings.serve.detector(settings.default_model_uri).model_dump(mode="json")


def detector_runtime_env() -> dict[str, Any]:
    """The environment of a replica that holds the model (the detector, or the colocated ingress)."""
    return {"env_vars": {**DETECTOR_ENV, **REGISTRY_CLIENT_ENV}}


def _autoscaling(min_replicas: int, max_replicas: int, target: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "min_replicas": min_replicas,
        "max_replicas": max(max_replicas, min_replicas, 1),
        "target_ongoing_requests": target,
        **extra,
    }


def ingress_options(settings: Settings, args: AppArgs) -> dict[str, Any]:
    serve = settings.serve
    return {
        "max_ongoing_requests": INGRESS_MAX_ONGOING,
        "autoscaling_config": _autoscaling(
            serve.ingress_min_replicas, serve.ingress_max_replicas, serve.target_ongoing_requests, args.autoscaling
        ),
        "ray_actor_options": {"num_cpus": 0.5},
    }


def detector_options(settings: Settings, args: AppArgs, num_gpus: float | None) -> dict[str, Any]:
    """Let requests queue inside the detector, where the batcher can take them; scale out only once batches are full.

    `max_ongoing_requests` must be at least `max_batch_size` or a batch never fills; it is set far higher because
    when every replica is at its cap, requests wait in the caller's router, which re-probes replicas for room
    (measured in benchmarks/RESULTS.md), while a crop waiting in the detector's queue costs only its bytes.
    `target_ongoing_requests` below the batch size would add replicas (and GPUs) while batches are still half empty,
    so the detector's target is at least `max_batch_size`.
    """
    serve = settings.serve
    options: dict[str, Any] = {
        "max_ongoing_requests": max(DETECTOR_MIN_ONGOING, 4 * serve.max_batch_size),
        "autoscaling_config": _autoscaling(
            serve.detector_min_replicas,
            serve.detector_max_replicas,
            max(serve.target_ongoing_requests, float(serve.max_batch_size)),
            args.autoscaling,
        ),
        "user_config": detector_user_config(settings),
    }
    if num_gpus is not None:
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": num_gpus, "runtime_env": detector_runtime_env()}
    return options


def colocated_options(settings: Settings, args: AppArgs, num_gpus: float | None) -> dict[str, Any]:
    """The one deployment of the colocated layout: the ingress's routes, holding the detector's model and batcher, so
    it takes the detector's queue depth, replica bounds and live user_config."""
    options = detector_options(settings, args, num_gpus)
    if "ray_actor_options" not in options:
        options["ray_actor_options"] = {"num_cpus": 1, "runtime_env": detector_runtime_env()}
    return options


def resolve_layout(settings: Settings, num_gpus: float | None) -> Literal["split", "colocated"]:
    """`serve.layout`, with "auto" decided where the detector's GPUs are known: one deployment, which saves the hop
    between processes, on a CPU node and on a GPU node alike (there its replicas share each card, `sized_for_node`;
    both measured in benchmarks/RESULTS.md). Unknown GPUs (a file written away from the cluster) give "split", which
    runs everywhere."""
    layout = settings.serve.layout
    if layout != "auto":
        return layout
    return "split" if num_gpus is None else "colocated"


def resolve_decode_on(settings: Settings, num_gpus: float | None) -> Literal["ingress", "detector"]:
    """`serve.decode_on`, with "auto" the CPUs on every node. The GPU's batch decode gives the same pixels
    (`app.chroma` rebuilds libjpeg-turbo's chroma from nvJPEG's), but in the default layout, eight replicas sharing
    one card, it measured slower than the replicas decoding on their cores (benchmarks/RESULTS.md, "The GPU pixel
    path"): "detector" stays a choice until it is the faster one."""
    del num_gpus  # every node decodes on its CPUs until the GPU measures faster
    decode_on = settings.serve.decode_on
    return "ingress" if decode_on == "auto" else decode_on


def resolved(settings: Settings, num_gpus: float | None) -> Settings:
    """The settings with `serve.layout` and `serve.decode_on` decided for these GPUs, as the replicas must see them.
    Unknown GPUs (a file written away from the cluster) leave `decode_on` to the builder, which knows them: unlike the
    layout, it does not change the deployments the file lists."""
    update: dict[str, Any] = {"layout": resolve_layout(settings, num_gpus)}
    if num_gpus is not None:
        update["decode_on"] = resolve_decode_on(settings, num_gpus)
    return settings.model_copy(update={"serve": settings.serve.model_copy(update=update)})


def sized_for_node(settings: Settings, cpus: float, gpus: float) -> Settings:
    """On a cluster with GPUs, what the user left at its default sized from the cluster. Colocated (the default
    layout): one replica per two cores, each holding an equal share of a card (HTTP, multipart, the decode and the
    batched model in one process), and a batch a GPU fills. Split: ingress replicas for the cores, a batch a GPU
    fills, and as many model replicas as the GPUs hold. A CPU cluster keeps the defaults; any value set in the
    settings, the environment or on the command line is kept."""
    if gpus <= 0:
        return settings
    serve = settings.serve
    chosen = serve.model_fields_set
    ingress = max(2, min(GPU_MAX_INGRESS_REPLICAS, int(cpus // 2)))
    if serve.layout != "split":
        return _sized_colocated(settings, ingress, gpus)
    defaults = {  # the bounds stay in order around a bound the user chose
        "ingress_min_replicas": min(ingress, serve.ingress_max_replicas)
        if "ingress_max_replicas" in chosen
        else ingress,
        "ingress_max_replicas": max(ingress, serve.ingress_min_replicas)
        if "ingress_min_replicas" in chosen
        else ingress,
        "max_batch_size": GPU_MAX_BATCH_SIZE,
        "detector_max_replicas": max(1, int(gpus / serve.gpus_per_replica)),
    }
    update = {key: value for key, value in defaults.items() if key not in chosen}
    return settings.model_copy(update={"serve": serve.model_copy(update=update)})


def _sized_colocated(settings: Settings, replicas: int, gpus: float) -> Settings:
    """``replicas`` colocated replicas spread evenly over whole cards, a fixed count (a card's share is not scaled
    by the autoscaler); a GPU share the user chose decides how many fit on each card instead."""
    serve = settings.serve
    chosen = serve.model_fields_set
    cards = max(1, int(gpus))
    per_card = int(1 / serve.gpus_per_replica) if "gpus_per_replica" in chosen else max(1, replicas // cards)
    defaults = {
        "gpus_per_replica": 1.0 / per_card,
        "detector_min_replicas": per_card * cards,
        "detector_max_replicas": per_card * cards,
        "max_batch_size": GPU_MAX_BATCH_SIZE,
    }
    update = {key: value for key, value in defaults.items() if key not in chosen}
    if "detector_min_replicas" in chosen or "detector_max_replicas" in chosen:  # a bound chosen: keep them in order
        update.pop("detector_min_replicas", None)
        update.pop("detector_max_replicas", None)
    return settings.model_copy(update={"serve": serve.model_copy(update=update)})


def detector_gpus(settings: Settings) -> float:
    """`serve.gpus_per_replica` per model replica when asked for, or when left to us (`use_gpu: null`) and the
    cluster has a GPU; 0 otherwise."""
    use_gpu = settings.serve.use_gpu
    if use_gpu is not None:
        return settings.serve.gpus_per_replica if use_gpu else 0.0
    import ray

    from app.ray_runtime import cluster_has_gpus

    return settings.serve.gpus_per_replica if ray.is_initialized() and cluster_has_gpus() else 0.0


def serve_config(settings: Settings, args: AppArgs | None = None, num_gpus: float | None = None) -> dict[str, Any]:
    """A `ServeDeploySchema` document. The detector's GPUs are left to the builder when `serve.use_gpu` is null and
    ``num_gpus`` is not given, so one file serves a laptop and a GPU cluster; the layout is resolved here, since the
    deployments the file lists must be the ones the builder makes."""
    args = args or AppArgs()
    fixed_gpus = None if settings.serve.use_gpu is None else detector_gpus(settings)
    gpus = fixed_gpus if fixed_gpus is not None else num_gpus
    settings = resolved(settings, gpus)
    layout = settings.serve.layout
    args = args.model_copy(update={"settings": {**portable_settings(settings), **args.settings}})
    if layout == "colocated":
        deployments = [{"name": INGRESS, **colocated_options(settings, args, fixed_gpus)}]
    else:
        deployments = [
            {"name": INGRESS, **ingress_options(settings, args)},
            {"name": DETECTOR, **detector_options(settings, args, fixed_gpus)},
        ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.serve.host, "port": settings.serve.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": BUILDER,
                "args": args.model_dump(mode="json"),
                "deployments": deployments,
            }
        ],
    }


_HEADER = """\
# Ray Serve config for the AI Product Photo Detector, generated by `aipd serve --write-config` from the settings.
#   laptop:   serve run serving/serve_config.yaml        (or simply: aipd serve)
#   cluster:  serve deploy serving/serve_config.yaml     (RAY_ADDRESS / --address names the cluster)
# Changing a detector user_config value and running `serve deploy` again applies it live (no replica restarts);
# model_uri may name models:/NAME@ALIAS (followed when the alias moves), models:/NAME/VERSION or a checkpoint dir.
# API keys are not stored here: set AIPD_API_KEYS on the cluster. Relative work_dir paths resolve where Ray runs.
# The detector asks for a GPU when serve.use_gpu is true, or when it is null and the cluster has GPUs.
# serve.layout says which deployments there are: split (ingress + detector) or colocated (one, for CPU-only nodes).
"""


def write_serve_config(path: str | Path, config: dict[str, Any]) -> Path:
    validate_serve_config(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    return path


def validate_serve_config(config: dict[str, Any]) -> Any:
    """Parse with Ray's own schema, the one `serve deploy` uses; raises pydantic's ValidationError when wrong."""
    from ray.serve.schema import ServeDeploySchema

    return (
        ServeDeploySchema.model_validate(config)
        if hasattr(ServeDeploySchema, "model_validate")
        else (ServeDeploySchema.parse_obj(config))
    )
