"""The MLflow side of the house: tracking setup, logging a detector, the model registry and the champion alias.

Training and tuning write here; serving and evaluation read from here. A registered version is an MLflow pyfunc
whose artifact is an ``app.model`` checkpoint directory, so ``mlflow models serve`` works on it too, and its
version tags carry the threshold and preprocessing settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.config import Settings
from app.errors import UserError
from app.model_ref import ModelRef, parse_model_ref, version_uri

if TYPE_CHECKING:
    import pandas as pd

CHECKPOINT_ARTIFACT = "checkpoint"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
# The registry's answers for an alias or a model that does not exist (a store may answer either of the first two)
MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def is_server(tracking_uri: str) -> bool:
    """Whether the tracking store is an MLflow server (which can be down) rather than a local file or folder."""
    return tracking_uri.startswith(("http://", "https://"))


class RegistryError(UserError, RuntimeError):
    """MLflow is unreachable or the requested model does not exist; the message says which."""


def setup_mlflow(settings: Settings) -> str:
    """Point MLflow at the configured store (the work directory's SQLite by default) and return the experiment id."""
    import mlflow

    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    elif is_server(uri):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from app.logging import route_library_logs

    route_library_logs()
    try:
        experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = settings.artifact_location if uri.startswith("sqlite:") else None
        return mlflow.create_experiment(settings.mlflow_experiment, artifact_location=artifact_location)
    except Exception as err:
        raise RegistryError(f"cannot use the MLflow tracking store {uri}: {err}") from err


def _check_server(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds with one line, instead of MLflow's minutes of retries, when the server is down."""
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.HTTPError as err:
        raise RegistryError(f"cannot reach the MLflow server at {uri}: {err or type(err).__name__}") from err


def registry_unreachable(settings: Settings, timeout_s: float = 5.0) -> str | None:
    """Why the MLflow server of these settings cannot be reached now, or None (a SQLite store is a local file).

    For a poller (the serving detector) that must tell in seconds that the registry went away, where MLflow's own
    client would retry for minutes first.
    """
    uri = settings.tracking_uri
    if not is_server(uri):
        return None
    try:
        _check_server(uri, timeout_s)
    except RegistryError as err:
        return str(err)
    return None


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]


def log_detector(settings: Settings, checkpoint_dir: Path, *, run_id: str, tags: dict[str, Any]) -> RegisteredVersion:
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

    # only "no such alias" (or model) means unset: a registry that fails to answer must not read as an alias
    # removed, or a service following it would drop its challenger on one locked read
    with missing_ok():
        mv = MlflowClient().get_model_version_by_alias(settings.registered_model, alias or settings.champion_alias)
        return RegisteredVersion(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))
    return None


@contextlib.contextmanager
def missing_ok() -> Iterator[None]:
    """Let "no such alias, tag or model" pass (another process removed it first); any other failure of the
    registry still raises."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        if err.error_code not in MISSING_CODES:
            raise


def set_alias(settings: Settings, version: str, alias: str | None = None) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(settings.registered_model, alias or settings.champion_alias, version)


@dataclass
class ResolvedModel:
    """A model reference made local: where its checkpoint lies, and which registry version it is."""

    checkpoint_dir: Path
    version: str  # the registry version, or "local:<dir name>" for a plain checkpoint path


def resolve_model(settings: Settings, uri: str | None = None) -> ResolvedModel:
    """Turn ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, another MLflow URI or a checkpoint path into files."""
    from app.checkpoint_files import is_checkpoint

    ref = parse_model_ref(uri or settings.default_model_uri)
    if ref.kind == "path":
        if not is_checkpoint(ref.uri):
            raise RegistryError(f"{ref.uri} is not a checkpoint directory (no model.pt and config.json there)")
        return ResolvedModel(Path(ref.uri), f"local:{Path(ref.uri).resolve().name}")
    import mlflow
    from mlflow.exceptions import MlflowException

    setup_mlflow(settings)
    version = "unknown"
    try:
        if ref.in_registry:
            version = registry_version(ref)
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri))
    except MlflowException as err:
        raise RegistryError(
            f"cannot load {ref.uri}: {err.message if hasattr(err, 'message') else err}. "
            "Train one first (`aipd train`) or pass a checkpoint path."
        ) from err
    checkpoint = _checkpoint_in(root)
    if checkpoint is None:
        raise RegistryError(f"{ref.uri} holds no aipd checkpoint")
    return ResolvedModel(checkpoint, version)


def _checkpoint_in(root: Path) -> Path | None:
    """Where a downloaded model keeps its checkpoint: the MLmodel file names it under the pyfunc artifacts."""
    import yaml

    from app.checkpoint_files import is_checkpoint

    if is_checkpoint(root):
        return root
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return None
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}) or {}
    relative = (artifacts.get(CHECKPOINT_ARTIFACT) or {}).get("path")
    if relative and is_checkpoint(root / relative):
        return root / relative
    return None


def registry_version(ref: ModelRef) -> str:
    """The version number a registry reference points at now (an alias is looked up), for answers and run links."""
    from mlflow import MlflowClient

    if ref.kind == "alias":
        return str(MlflowClient().get_model_version_by_alias(ref.name, ref.alias).version)
    return str(ref.version)


EVALUATION_PREFIXES = ("test_", "val_", "eval_")


def version_metrics(name: str, version: str) -> dict[str, float]:
    """What the registry knows of a version's quality: its training run's test and validation metrics, then its own
    tags (the validation AUROC it was registered with wins over the run's last epoch)."""
    import math

    from mlflow import MlflowClient

    client = MlflowClient()
    registered = client.get_model_version(name, version)
    values: dict[str, object] = dict(client.get_run(registered.run_id).data.metrics) if registered.run_id else {}
    values.update(registered.tags or {})
    metrics: dict[str, float] = {}
    for key, value in values.items():
        try:
            number = float(value)  # tags are strings
        except (TypeError, ValueError):
            continue
        if key.startswith(EVALUATION_PREFIXES) and math.isfinite(number):
            metrics[key] = number
    return metrics


def source_run(ref: ModelRef) -> str | None:
    """The run that made a registered version, so its evaluation lands beside its training."""
    if not ref.in_registry:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version(ref.name, registry_version(ref)).run_id
    except MlflowException:
        return None


def mlflow_ui_url(settings: Settings) -> str:
    """Where a person looks at the runs: the tracking server itself, or the local MLflow UI over the SQLite store."""
    uri = settings.tracking_uri
    return uri.rstrip("/") if is_server(uri) else LOCAL_MLFLOW_UI


def mlflow_ui_hint(settings: Settings) -> str:
    """One line that tells how to open the MLflow UI for these settings."""
    uri = settings.tracking_uri
    if is_server(uri):
        return uri
    return f"mlflow ui --backend-store-uri {uri}  (then open {LOCAL_MLFLOW_UI})"


def run_link(settings: Settings, experiment_id: str, run_id: str) -> str:
    link = f"{mlflow_ui_url(settings)}/#/experiments/{experiment_id}/runs/{run_id}"
    if is_server(settings.tracking_uri):
        return link
    return f"{link}  (after `mlflow ui --backend-store-uri {settings.tracking_uri}`)"


# ------------------------------------------------------------------------------------------------- the champion
def apply_champion_rule(
    settings: Settings, new_version: str, new_val_auroc: float, val_records: pd.DataFrame
) -> tuple[bool, str]:
    """Move ``champion`` to the new version only if it beats the current champion on this same validation split.

    The champion is re-scored now rather than trusted from its tags: an older version was validated on another
    split, by another preprocessing, or not at all.
    """
    from app.model import load_checkpoint
    from app.scoring import validation_auroc

    current = get_alias_version(settings)
    if current is None:
        set_alias(settings, new_version)
        return True, f"champion -> version {new_version} (there was no champion yet; val AUROC {new_val_auroc:.4f})"
    if current.version == new_version:
        return True, f"version {new_version} is already the champion"
    champion_ref = version_uri(settings.registered_model, current.version)
    champion = load_checkpoint(resolve_model(settings, champion_ref).checkpoint_dir)
    champion_auroc = validation_auroc(champion, val_records, settings.images)
    if new_val_auroc > champion_auroc:
        set_alias(settings, new_version)
        return True, (
            f"champion -> version {new_version}: val AUROC {new_val_auroc:.4f} beats version "
            f"{current.version}'s {champion_auroc:.4f} on the same validation data"
        )
    return False, (
        f"champion stays at version {current.version}: its val AUROC {champion_auroc:.4f} >= "
        f"{new_val_auroc:.4f} of the new version {new_version} on the same validation data"
    )
