"""The MLflow side of the house: tracking setup, logging a detector, the model registry and the champion alias.

Training and tuning write here; serving and evaluation read from here. A registered version is an MLflow pyfunc
whose artifact is an ``app.model`` checkpoint directory, so ``mlflow models serve`` works on it too, and its
version tags carry the threshold and preprocessing settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings

CHECKPOINT_ARTIFACT = "checkpoint"


class RegistryError(RuntimeError):
    """MLflow is unreachable or the requested model does not exist; the message says which."""


def setup_mlflow(settings: Settings) -> str:
    """Point MLflow at the configured store (the work directory's SQLite by default) and return the experiment id."""
    import mlflow

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = settings.artifact_location if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(settings.mlflow_experiment, artifact_location=artifact_location)
    except Exception as err:
        raise RegistryError(f"cannot use the MLflow tracking store {uri}: {err}") from err


def _check_server(uri: str) -> None:
    """Fail in seconds with one line, instead of MLflow's minutes of retries, when the server is down."""
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=5.0)
    except httpx.HTTPError as err:
        raise RegistryError(f"cannot reach the MLflow server at {uri}: {err}") from err


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def log_detector(
    settings: Settings, checkpoint_dir: Path, *, run_id: str, tags: dict[str, Any]
) -> RegisteredVersion:
    """Log the checkpoint to ``run_id`` as a pyfunc model and register it as a new version of the detector."""
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="detector",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={CHECKPOINT_ARTIFACT: str(checkpoint_dir)},
            pip_requirements=["torch", "timm", "pillow", "numpy"],
            registered_model_name=settings.registered_model,
        )
    version = str(info.registered_model_version)
    client = MlflowClient()
    clean = {k: str(v) for k, v in tags.items() if v is not None}
    for key, value in clean.items():
        client.set_model_version_tag(settings.registered_model, version, key, value)
    return RegisteredVersion(settings.registered_model, version, run_id, clean)


def get_alias_version(settings: Settings, alias: str | None = None) -> RegisteredVersion | None:
    """The version an alias points at, or None when the alias (or the model) does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(settings.registered_model, alias or settings.champion_alias)
    except MlflowException:
        return None
    return RegisteredVersion(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def set_alias(settings: Settings, version: str, alias: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(settings.registered_model, alias or settings.champion_alias, version)


@dataclass
class ResolvedModel:
    """A model reference made local: where its checkpoint lies, and which registry version it is."""

    checkpoint_dir: Path
    version: str  # the registry version, or "local:<dir name>" for a plain checkpoint path


def resolve_model(settings: Settings, uri: str | None = None) -> ResolvedModel:
    """Turn ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/...`` or a checkpoint path into local files."""
    uri = uri or settings.default_model_uri
    local = Path(uri)
    if "://" not in uri and not uri.startswith("models:/"):
        if not (local / "config.json").is_file():
            raise RegistryError(f"{uri} is not a checkpoint directory (no config.json there)")
        return ResolvedModel(local, f"local:{local.resolve().name}")
    import mlflow
    from mlflow.exceptions import MlflowException

    setup_mlflow(settings)
    version = "unknown"
    try:
        if uri.startswith("models:/"):
            version = registry_version(uri)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except MlflowException as err:
        raise RegistryError(
            f"cannot load {uri}: {err.message if hasattr(err, 'message') else err}. "
            "Train one first (`aipd train`) or pass a checkpoint path."
        ) from err
    checkpoint = _checkpoint_in(root)
    if checkpoint is None:
        raise RegistryError(f"{uri} holds no aipd checkpoint")
    return ResolvedModel(checkpoint, version)


def _checkpoint_in(root: Path) -> Path | None:
    """Where a downloaded model keeps its checkpoint: the MLmodel file names it under the pyfunc artifacts."""
    import yaml

    if (root / "config.json").is_file():
        return root
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return None
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}
    relative = (artifacts.get(CHECKPOINT_ARTIFACT) or {}).get("path")
    if relative and (root / relative / "config.json").is_file():
        return root / relative
    return None


def registry_version(uri: str) -> str:
    """The version number a ``models:/`` URI points at now (an alias is looked up), for responses and run links."""
    from mlflow import MlflowClient

    ref = uri.removeprefix("models:/")
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.partition("/")
    return version or "latest"
