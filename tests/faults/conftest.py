"""Fixtures of the fault tests that stop a real MLflow server."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def restore_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow.set_tracking_uri` and `set_registry_uri` (in `setup_mlflow`) keep the URIs in module globals and in the
    environment, for subprocesses: put them back afterwards, or later tests and their subprocesses would call this
    test's dead server (and wait out MLflow's minutes of retries)."""
    from mlflow.tracking._model_registry import utils as registry
    from mlflow.tracking._tracking_service import utils as tracking

    monkeypatch.setattr(tracking, "_tracking_uri", tracking._tracking_uri)
    monkeypatch.setattr(registry, "_registry_uri", registry._registry_uri)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # recorded (set or not) and put back at teardown
        if not os.environ[name]:
            monkeypatch.delenv(name)
