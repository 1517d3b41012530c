"""Helpers the test suites share: free ports, photos, tiny real checkpoints and settings, waiting, metrics.

Fixtures live in the conftest.py files; everything a test imports lives here, so no test imports a conftest.
"""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
from PIL import Image

from app.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
# A test's application is running in seconds; past this its replicas wait for resources an earlier test still holds.
DEPLOY_TIMEOUT_S = 240.0
TINY_BACKBONE = "mobilenetv3_small_050"
CROP = 64


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(
    directory: Path,
    seed: int = 0,
    threshold: float = 0.5,
    crop_size: int = CROP,
    metrics: dict | None = None,
    source_families: list[str] | None = None,
    residual_verdict: bool = False,
) -> Path:
    """An untrained tiny detector: real weights, real config, loads in well under a second. `metrics` are the
    evaluation numbers its config.json claims, which /health reports for a checkpoint served from disk;
    `source_families` gives it the source head, `residual_verdict` the residual verdict (unfitted) and with it the
    residual statistics."""
    import torch

    from app.config import ModelSettings
    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint

    torch.manual_seed(seed)
    families = list(source_families or [])
    defaults = ModelSettings()  # the head a training with families builds
    cfg = ModelConfig(
        backbone=TINY_BACKBONE,
        hidden=32,
        source_families=families,
        source_spectrum=defaults.source_spectrum if families or residual_verdict else 0,
        source_phase=defaults.source_phase if families or residual_verdict else 0,
        residual_verdict=residual_verdict,
    )
    return save_checkpoint(
        directory,
        build_model(cfg),
        cfg,
        PreprocessSettings(crop_size=crop_size),
        threshold=threshold,
        metrics=metrics,
    )


def jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def with_comment(jpeg_bytes: bytes, n: int) -> bytes:
    """The same photo as other bytes (a JPEG comment segment holding ``n``): a load of distinct uploads that the
    answer cache cannot serve, at no encoding cost."""
    payload = f"request {n}".encode()
    return jpeg_bytes[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg_bytes[2:]


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


def model_deployment(app_name: str) -> str:
    """The deployment that holds the model: the detector (split layout), or the ingress itself (colocated)."""
    from ray import serve

    deployments = serve.status().applications[app_name].deployments
    return "DetectorDeployment" if "DetectorDeployment" in deployments else "IngressDeployment"


def running_replicas(app_name: str, deployment: str) -> int:
    from ray import serve

    status = serve.status().applications[app_name].deployments[deployment]
    return int(status.replica_states.get("RUNNING", 0))


def replica_pids(app_name: str, deployment: str) -> list[int]:
    """Process ids of a deployment's live replicas in the connected cluster (the GCS actor table, not a /proc scan,
    so another cluster's replicas on this machine are never matched)."""
    from ray._private.state import actors

    class_name = f"ServeReplica:{app_name}:{deployment}"
    return sorted(a["Pid"] for a in actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == class_name)


class ServeApp:
    """A deployed application: its base URL and an HTTP client."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(base_url=self.url, timeout=60.0)

    def predict(
        self,
        data: bytes,
        filename: str = "photo.jpg",
        key: str | None = None,
        route: str = "/predict",
        content_type: str = "image/jpeg",
    ) -> httpx.Response:
        headers = {"X-API-Key": key} if key else {}
        return self.http.post(route, files={"file": (filename, data, content_type)}, headers=headers)

    def metrics(self) -> str:
        response = self.http.get("/metrics")
        assert response.status_code == 200
        return response.text


def with_serve(settings: Settings, **serve: Any) -> Settings:
    """These settings with some serve settings changed (the detector's champion_poll_s, its model_uri, ...)."""
    return settings.model_copy(update={"serve": settings.serve.model_copy(update=serve)})


def undeploy(name: str) -> None:
    from ray import serve

    from serving.metrics import drop_store

    try:
        serve.delete(name)
    finally:
        drop_store(name)


# ----------------------------------------------------------------------------------------------- training, tuning
def tiny_settings(work_dir: Path, data: Path, **train: object) -> Settings:
    """Two CPU workers, 48-px crops, a couple of epochs: seconds per epoch on 2 cores."""
    values = {"epochs": 2, "batch_size": 8, "crop_size": 48, "num_workers": 2, "use_gpu": False, "lr": 2e-3}
    values.update(train)
    return load_settings(work_dir=work_dir, data={"path": str(data)}, train=values, log_format="console")


TINY_SPACE = {
    "batch_size": [8],
    "crop_size": [48],
    "dropout": [0.1],
    "augment_prob": [0.3],
    "lr": (1e-3, 3e-3),
    "weight_decay": (1e-3, 1e-2),
}


def tiny_tune_values(**tune: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "num_samples": 4,
        "max_concurrent": 2,
        "epochs": 3,
        "search_alg": "random",
        "grace_period": 1,
        "reduction_factor": 2,
        "cpus_per_trial": 1,
        **TINY_SPACE,
    }
    values.update(tune)
    return values


def tiny_tune_settings(work_dir: Path, data: Path, **tune: Any) -> Settings:
    return load_settings(
        work_dir=work_dir,
        data={"path": str(data)},
        log_format="console",
        train={"num_workers": 1, "use_gpu": False, "batch_size": 8, "crop_size": 48},
        tune=tiny_tune_values(**tune),
    )


def invoke(app: Any, args: list[str]) -> Any:
    """CliRunner.invoke, then point logging back at the real stderr: the command configured structlog with the
    runner's temporary stream, which is closed once the command returns."""
    from typer.testing import CliRunner

    from app.logging import configure_logging

    result = CliRunner().invoke(app, args)
    configure_logging("json")
    configure_logging("console")
    return result


def failure_text(result: Any, tail: int = 3000) -> str:
    """What a failed CliRunner invocation printed, and the exception it raised with its traceback (the output alone
    hides an error that escaped the command)."""
    import traceback

    text = result.output[-tail:]
    if result.exc_info and not isinstance(result.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*result.exc_info))[-tail:]
    return text


# ----------------------------------------------------------------------------------------------------------- ui
UI_PAGE = ROOT / "ui" / "streamlit_app.py"
UI_KEY = "ui-test-key"


def photo(brightness: float, fmt: str = "JPEG", size: tuple[int, int] = (160, 120), seed: int = 0) -> bytes:
    """A noisy image around `brightness` (0..1): the contract server calls bright ones AI-generated."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(brightness * 255 + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make test` installs it, and no test downloads a browser
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


# -------------------------------------------------------------------------------------------------------- demo
def write_learnable_dataset(root: Path, per_class: int, size: int = 64, seed: int = 0) -> Path:
    """train/val/test folders of smooth photos (real) and the same with strong pixel noise (ai_generated).

    The noise survives the random crops and flips the high-pass stem sees, so a tiny model learns it within a few
    dozen steps: a short training on it improves from epoch to epoch, which the demo's live switch needs.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    for split, count in (("train", per_class), ("val", max(4, per_class // 3)), ("test", max(4, per_class // 3))):
        for label in ("real", "ai_generated"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a, b, c = rng.uniform(-1, 1, 3)
                base = 128 + 50 * np.sin(a * x / 10 + b * y / 10 + c)
                pixels = np.stack([base, np.roll(base, 3, 0), np.roll(base, 5, 1)], -1)
                pixels = pixels + rng.normal(0, 10 if label == "ai_generated" else 2, pixels.shape)
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=95)
    return root
