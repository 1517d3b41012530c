"""Serving fixtures: one Serve instance on a free port for the session, tiny real checkpoints, and upload helpers.

Each test module deploys its own application (a real ingress and a real detector) at "/" and deletes it at the end,
so only one application owns the root at a time.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pytest
from PIL import Image

TINY_BACKBONE = "mobilenetv3_small_050"
CROP = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(directory: Path, seed: int = 0, threshold: float = 0.5, crop_size: int = CROP) -> Path:
    """An untrained tiny detector: real weights, real config, loads in well under a second."""
    import torch

    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    torch.manual_seed(seed)
    cfg = ModelConfig(backbone=TINY_BACKBONE, hidden=32)
    return save_checkpoint(directory, build_model(cfg), cfg, PreprocessSettings(crop_size=crop_size), threshold=threshold)


def jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def wait_until(condition: Callable[[], Any], timeout_s: float, interval_s: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app_name].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


class ServeApp:
    """A deployed application: its base URL and an HTTP client."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60.0)

    def predict(self, data: bytes, filename: str = "photo.jpg", key: str | None = None, route: str = "/predict",
                content_type: str = "image/jpeg") -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return self.http.post(route, files={"file": (filename, data, content_type)}, headers=headers)

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        assert response.status_code == 200
        return response.text


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """The HTTP port of this cluster's Serve instance: started here on a free port unless another suite did."""
    from ray import serve
    from ray.serve.context import _get_global_client

    wanted = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": wanted})
    port = int(_get_global_client().http_config.port)
    yield port
    if port == wanted:
        serve.shutdown()


@pytest.fixture(scope="session")
def deploy(serve_port: int) -> Callable[..., ServeApp]:
    """deploy(name, settings, args) -> ServeApp, at "/"; the module that deploys calls undeploy(name) when done."""
    from ray import serve

    from serving.app_builder import build_application

    def _deploy(name: str, settings: Any, args: Any = None) -> ServeApp:
        serve.run(build_application(settings, args), name=name, route_prefix="/")
        return ServeApp(name, serve_port)

    return _deploy


def undeploy(name: str) -> None:
    from ray import serve

    from serving.metrics import drop_store

    try:
        serve.delete(name)
    finally:
        drop_store(name)
