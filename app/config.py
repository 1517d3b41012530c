"""One typed settings object for every stage.

Precedence, lowest to highest: the defaults below, a YAML file (``--config FILE``), ``AIPD_*`` environment variables
(nested sections use a double underscore: ``AIPD_TRAIN__EPOCHS=3``), then command-line flags. No other module reads
``os.environ``: they are handed a ``Settings``.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from app.errors import UserError

_yaml_file: ContextVar[Path | None] = ContextVar("aipd_yaml_file", default=None)


class ConfigError(UserError, ValueError):
    """A settings file or value the user must fix; the message names it."""


class DataSettings(BaseModel):
    path: str | None = Field(None, description="Dataset folder, manifest (CSV/Parquet) or URI; default: the demo set")
    demo_images_per_class: int = Field(1400, ge=8)
    demo_size: int = Field(128, ge=32, le=1024)
    demo_seed: int = 0


class ImageLimits(BaseModel):
    max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)


class ModelSettings(BaseModel):
    backbone: str = "efficientnet_b0"
    hidden: int = 512
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    forensic_stem: bool = True
    stem_norm: bool = Field(False, description="scale each photo's residual to unit RMS (its pattern, not its energy)")
    source_spectrum: int = Field(
        16,
        ge=0,
        le=64,
        description="side of the residual spectrum grid the source head and the residual verdict read (0: none)",
    )
    source_phase: int = Field(
        5,
        ge=0,
        le=8,
        description="largest lag of the residual's 2-periodic correlations the source head and residual verdict read",
    )
    residual_verdict: bool = Field(
        True,
        description="blend the verdict with a linear model on the residual statistics, fitted after training on "
        "clean and degraded photos (it keeps evidence blur and JPEG leave that the pooled features lose)",
    )
    pretrained_weights: str | None = None


class AugmentSettings(BaseModel):
    """The degradations training draws for each image, for both classes alike, in a random order
    (app/degradations.py): each on its own probability, at a random strength."""

    blur_prob: float = Field(0.15, ge=0.0, le=1.0)
    blur_sigma_max: float = Field(2.0, gt=0.0)
    downscale_prob: float = Field(0.15, ge=0.0, le=1.0)
    downscale_min: float = Field(0.4, gt=0.0, lt=1.0, description="the smallest resize factor drawn (up to 0.9)")
    upscale_back_prob: float = Field(0.5, ge=0.0, le=1.0, description="share of downscales resized back up")
    jpeg_prob: float = Field(0.4, ge=0.0, le=1.0)
    jpeg_quality_min: int = Field(30, ge=1, le=100, description="the lowest JPEG quality drawn (up to 95)")


class GpuSizing(BaseModel):
    """What a training on GPUs runs with for each of epochs, batch_size and crop_size that is not set: an epoch of the
    demo set takes a GPU seconds, so it affords the longer schedule that the GPU's targets need."""

    epochs: int = Field(24, ge=1)
    batch_size: int = Field(64, ge=1, description="per worker")
    crop_size: int = Field(112, ge=32)


class TrainSettings(BaseModel):
    epochs: int = Field(9, ge=1, description="on CPUs; on GPUs `gpu.epochs` unless set")
    batch_size: int = Field(64, ge=1, description="per worker; on GPUs `gpu.batch_size` unless set")
    crop_size: int = Field(112, ge=32, description="on GPUs `gpu.crop_size` unless set")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    target_fpr: float = Field(0.01, gt=0, lt=1)
    source_loss_weight: float = Field(
        0.5,
        ge=0,
        description="weight of the source head's loss (which generator family) beside the verdict's; the head is "
        "trained when the data names each AI photo's generator; 0: the binary head alone",
    )
    source_clean_only: bool = Field(
        False, description="train the source head on the crops no degradation changed (the verdict on all of them)"
    )
    decode_on: Literal["auto", "tasks", "workers"] = Field(
        "auto",
        description="where training photos are decoded and augmented: tasks (Ray Data's CPU tasks, Pillow) or "
        "workers (each Ray Train worker, in batches on its device: nvJPEG and the degradations on the GPU; the "
        "tasks only read and check); auto: tasks, the faster on a GPU node too",
    )
    max_failures: int = Field(2, ge=-1)
    seed: int = 0
    challenger_percent: float | None = Field(
        None,
        gt=0,
        le=100,
        description="register the trained model as the challenger on a canary of this share of the photos, "
        "instead of the champion rule (retraining; it becomes champion only when there is none yet)",
    )
    augment: AugmentSettings = AugmentSettings()
    gpu: GpuSizing = GpuSizing()

    def sized_for(self, use_gpu: bool) -> TrainSettings:
        """These settings for the device the run trains on: on GPUs, `gpu`'s values for what was not set."""
        if not use_gpu:
            return self
        return self.model_copy(
            update={
                name: getattr(self.gpu, name) for name in GpuSizing.model_fields if name not in self.model_fields_set
            }
        )


class TuneSettings(BaseModel):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="experiment name (folder tune-<name> under ray_results); None: a timestamp, or the latest on "
        "resume",
    )
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    epochs: int = Field(4, ge=1)
    search_alg: Literal["random", "optuna", "hyperopt"] = Field(
        "optuna", description="optuna/hyperopt fall back to random search when the library is not installed"
    )
    scheduler: Literal["asha", "fifo"] = Field("asha", description="fifo runs every trial to the end (benchmarks)")
    gpus_per_trial: float = Field(1.0, ge=0, description="per Train worker of a trial; below 1 packs trials on one GPU")
    cpus_per_trial: float = Field(1.0, gt=0, description="per Train worker of a trial (Ray logical CPUs)")
    grace_period: int = Field(1, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA keeps the best 1/reduction_factor at each rung")
    lr: tuple[float, float] = (3e-4, 5e-3)
    weight_decay: tuple[float, float] = (1e-3, 0.1)
    dropout: list[float] = [0.1, 0.3, 0.5]
    batch_size: list[int] = [32, 64]
    crop_size: list[int] = [96, 112]
    augment_prob: list[float] = [0.1, 0.3, 0.5]

    @field_validator("lr", "weight_decay")
    @classmethod
    def _log_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high:
            raise ValueError(f"a log-uniform range needs 0 < low <= high, got {value}")
        return value

    @field_validator("dropout", "batch_size", "crop_size", "augment_prob")
    @classmethod
    def _non_empty(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError("give at least one value to choose from")
        return value


Precision = Literal["auto", "fp32", "bf16"]
MAX_BATCH_WAIT_S = 1.0  # a lone request waits this long for company at most; above it is a misconfiguration


class DetectorSettings(BaseModel):
    """What a detector replica runs by: the `user_config` of the deployment that holds the model, so all of it can
    change live (`serve deploy` with new values, no restart). `ServeSettings` carries these fields, and a detector is
    handed exactly them (`ServeSettings.detector`)."""

    model_uri: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint dir")
    max_batch_size: int = Field(32, ge=1, description="images per forward pass")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, le=MAX_BATCH_WAIT_S, description="how long a batch that is not full may wait for more; 0: never"
    )
    champion_poll_s: float = Field(
        10.0, ge=0, description="how often an alias model URI (models:/NAME@ALIAS) is re-resolved; 0 turns it off"
    )
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for inference; None: the cores available")
    precision: Precision = Field(
        "auto", description="auto: bf16 where the hardware has it (a GPU, a CPU with AVX512-BF16 or AMX), else fp32"
    )
    cuda_graphs: bool = Field(True, description="on a GPU, replay each padded batch size as a captured CUDA graph")
    rollout_min_requests: int = Field(50, ge=1, description="a challenger is judged once it has scored this many")
    rollout_error_margin: float = Field(
        0.05, ge=0, description="a challenger whose error rate exceeds the champion's by more is rolled back"
    )
    rollout_latency_margin: float = Field(
        0.5, ge=0, description="... or whose p99 latency exceeds the champion's by more than this share of it"
    )
    rollout_max_disagreement: float = Field(
        0.2, ge=0, le=1, description="shadow: ... or whose verdicts differ from the champion's on more of the photos"
    )


class ServeSettings(DetectorSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_batch_files: int = Field(32, ge=1)
    rate_limit_per_minute: int = Field(
        600, ge=0, description="per API key (or client address where the data path carries one); 0: off"
    )
    cache_url: str | None = Field(
        None, description="redis://host:port/db: one answer cache every ingress replica shares; None: one per replica"
    )
    cache_max_entries: int = Field(10_000, ge=0, description="answers an in-process cache keeps; 0 turns it off")
    cache_max_bytes: int = Field(32 * 1024 * 1024, ge=1, description="bytes of answers an in-process cache keeps")
    cache_ttl_s: int = Field(86_400, gt=0, description="how long Redis keeps an answer")
    retrain_data: str | None = Field(
        None,
        description="labelled photos (a folder or manifest, e.g. recent moderated uploads) that a drift alert retrains "
        "on, the result starting as a canary; None: drift only alerts",
    )
    retrain_percent: float = Field(10.0, gt=0, le=100, description="the canary share a retrained model starts on")
    ingress_min_replicas: int = Field(1, ge=0)
    ingress_max_replicas: int = Field(2, ge=1)
    detector_min_replicas: int = Field(1, ge=0)
    detector_max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    use_gpu: bool | None = None
    layout: Literal["auto", "split", "colocated"] = Field(
        "auto",
        description="split: an ingress deployment in front of a detector deployment; colocated: one deployment that "
        "decodes and runs the batched model (no hop between processes; on a GPU node its replicas share each card); "
        "auto: colocated where the GPUs are known, split in a config file written away from the cluster",
    )
    decode_on: Literal["auto", "ingress", "detector"] = Field(
        "auto",
        description="where uploads are decoded and cropped: ingress (on its CPUs, one photo at a time) or detector "
        "(in the batch, on the model's device: nvJPEG on a GPU with libjpeg-turbo's chroma rebuilt, so only bytes "
        "cross between deployments; photos whose clipped colour hides chroma are decoded on the CPU); auto: "
        "ingress, measured the faster on a GPU node too",
    )
    gpus_per_replica: float = Field(
        1.0,
        gt=0,
        le=1,
        description="the GPU share each model replica asks for where GPUs are used: below 1, several replicas (e.g. "
        "colocated ones, each decoding and running the model in one process) share a card",
    )
    high_throughput: bool = Field(
        True,
        description="Ray Serve's HAProxy ingress and gRPC between deployments on clusters this project starts "
        "(RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_THROUGHPUT_OPTIMIZED); clusters started elsewhere set them themselves",
    )

    def detector(self, model_uri: str | None = None) -> DetectorSettings:
        """The detector's share of these settings (its user_config), naming ``model_uri`` when given."""
        values = self.model_dump(include=set(DetectorSettings.model_fields))
        return DetectorSettings(**{**values, **({"model_uri": model_uri} if model_uri else {})})


class UiSettings(BaseModel):
    """The Streamlit UI: which API it calls, with which key, and the dashboards it links to (hidden when unset)."""

    api_url: str | None = Field(None, description="HTTP API the UI calls; None: the serve host and port")
    api_key: str | None = Field(None, description="the API key the UI sends; None: the first of api_keys, if any")
    host: str = Field("127.0.0.1", description="address the Streamlit server listens on (0.0.0.0: every interface)")
    port: int = Field(8501, ge=1, le=65535)
    ray_dashboard_url: str | None = Field(None, description="e.g. http://127.0.0.1:8265")
    mlflow_url: str | None = Field(None, description="e.g. http://127.0.0.1:5000 (`mlflow ui`)")
    grafana_url: str | None = Field(None, description="e.g. http://127.0.0.1:3000")
    scan_dir: str | None = Field(None, description="the scan output the catalog scan page opens first")


class DemoSettings(BaseModel):
    """`aipd demo`: the whole loop on one machine, serving early and improving while it serves."""

    first_model_epoch: int = Field(
        2,
        ge=1,
        description="after this many epochs of train.epochs the demo registers and serves the checkpoint it has, "
        "then trains on; the finished model takes over live if it beats that one on validation data",
    )
    trickle_interval_s: float = Field(
        1.0, gt=0, description="the pause between the demo's own requests while the champion may move"
    )


class Settings(BaseSettings):
    """Everything configurable, with the laptop defaults."""

    model_config = SettingsConfigDict(
        env_prefix="AIPD_", env_nested_delimiter="__", extra="forbid", validate_default=True, populate_by_name=True
    )

    work_dir: Path = Path(".aipd")
    log_format: Literal["console", "json"] = "console"
    log_level: str = "INFO"
    verbose: bool = Field(
        False, description="show Ray's, Serve's and the libraries' logs on the terminal too (`aipd --verbose`)"
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster address (AIPD_RAY_ADDRESS or Ray's own RAY_ADDRESS); None starts a local one",
        validation_alias=AliasChoices("ray_address", "AIPD_RAY_ADDRESS", "RAY_ADDRESS"),
    )
    ray_num_cpus: int | None = Field(None, description="logical CPUs for a local Ray; None: max(8, cores)")
    mlflow_tracking_uri: str | None = Field(None, description="None: a SQLite store in the work directory")
    mlflow_experiment: str = "aipd"
    registered_model: str = "aipd-detector"
    champion_alias: str = "champion"
    challenger_alias: str = Field("challenger", description="the version on trial beside the champion (aipd rollout)")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="AIPD_API_KEYS=k1,k2; empty turns keys off"
    )
    data: DataSettings = DataSettings()
    images: ImageLimits = ImageLimits()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    tune: TuneSettings = TuneSettings()
    serve: ServeSettings = ServeSettings()
    ui: UiSettings = UiSettings()
    demo: DemoSettings = DemoSettings()

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_file.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)

    # Derived locations: everything a laptop run writes lives under the work directory.
    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def demo_data_dir(self) -> Path:
        d = self.data
        return self.data_dir / f"demo-{d.demo_images_per_class}x{d.demo_size}-s{d.demo_seed}"

    def checkpoint_dir(self, run_id: str) -> Path:
        """Where the model a run registers is kept, outside Ray's storage; absolute, for processes elsewhere."""
        return (self.work_dir / "checkpoints" / run_id).resolve()

    @property
    def log_file(self) -> Path:
        """Where a command's whole log goes, whatever the terminal shows."""
        return self.work_dir / "logs" / "aipd.log"

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{(self.work_dir / 'mlflow.db').resolve()}"

    @property
    def artifact_location(self) -> str:
        return (self.work_dir / "mlartifacts").resolve().as_uri()

    @property
    def ray_storage(self) -> Path:
        return (self.work_dir / "ray_results").resolve()

    @property
    def local_num_cpus(self) -> int:
        """Ray Data and Train deadlock when logical CPUs equal the 2 real cores, so a laptop gets more."""
        return self.ray_num_cpus or max(8, os.cpu_count() or 1)

    @property
    def default_model_uri(self) -> str:
        from app.model_ref import alias_uri

        return self.serve.model_uri or alias_uri(self.registered_model, self.champion_alias)

    @property
    def service_url(self) -> str:
        """Where a client on this machine reaches the HTTP API that `aipd serve` starts with these settings."""
        return reachable_url(self.serve.host, self.serve.port)


WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def reachable_url(host: str, port: int) -> str:
    """The URL a client on this machine opens for a server bound to ``host:port`` (a wildcard: via loopback)."""
    shown = "127.0.0.1" if host in WILDCARD_HOSTS else host
    if ":" in shown:  # an IPv6 literal
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings; ``overrides`` are command-line values (nested as dicts) and win over everything.

    ``None`` overrides are dropped so that an unset flag never hides a value from the file or the environment.
    """
    path = Path(config_file) if config_file else None
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    token = _yaml_file.set(path)
    try:
        return Settings(**_drop_none(overrides))
    finally:
        _yaml_file.reset(token)


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            nested = _drop_none(value)
            if nested:
                out[key] = nested
        elif value is not None:
            out[key] = value
    return out
