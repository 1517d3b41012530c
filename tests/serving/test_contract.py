"""The HTTP contract against a real Serve application: every route, the bad-input corpus, odd but valid images,
huge uploads, batching, application-wide metrics, API keys and rate limits.

Each layout runs the whole module: split (two ingress replicas in front of one detector replica, so the metrics must
add up across replicas; the ingress checks each upload and the detector decodes it in its batch, as on a GPU node)
and colocated (one replica that decodes and holds the model, the layout `aipd serve` picks on a CPU node). The model
is a tiny untrained detector from a checkpoint.
"""

from __future__ import annotations

import asyncio
import base64
import io
import select
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests import hostile_images as hostile
from tests.helpers import (
    CROP,
    ServeApp,
    jpeg,
    make_checkpoint,
    metric_value,
    model_deployment,
    running_replicas,
    undeploy,
    wait_until,
    with_serve,
)

pytestmark = pytest.mark.slow

KEY = "contract-key"
BATCH_KEY = "batch-key"
LIMITED_KEY = "limited-key"
MAX_BYTES = 2 * 1024 * 1024
RATE = 100
APP = "contract"


LAYOUTS = {
    "split": {"layout": "split", "decode_on": "detector", "ingress_min_replicas": 2, "ingress_max_replicas": 2},
    "colocated": {"layout": "colocated"},
}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def service(request: pytest.FixtureRequest, deploy, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    from app.config import Settings
    from serving.config import AppArgs

    root = tmp_path_factory.mktemp("contract")
    checkpoint = make_checkpoint(root / "tiny-ckpt", seed=1)
    settings = Settings(
        work_dir=root / "work",
        api_keys=[KEY, BATCH_KEY, LIMITED_KEY],
        images={"max_bytes": MAX_BYTES, "max_pixels": 20_000_000},
        serve={
            "model_uri": str(checkpoint),
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.05,
            "max_batch_files": 4,
            "rate_limit_per_minute": RATE,
            "ingress_min_replicas": 2,
            "ingress_max_replicas": 2,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
            **LAYOUTS[request.param],
        },
    )
    app = deploy(APP, with_serve(settings, champion_poll_s=0), AppArgs(autoscaling={}))
    yield app
    undeploy(APP)


def assert_error(response: httpx.Response, status: int, error: str | tuple[str, ...]) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] in ((error,) if isinstance(error, str) else error), body
    assert body["detail"]


# ------------------------------------------------------------------------------------------------------ routes
def test_liveness_and_readiness(service: ServeApp) -> None:
    assert service.http.get("/healthz").json() == {"status": "alive", "alive": True}
    health = service.http.get("/health")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy" and body["state"] == "ok" and body["model_loaded"] is True
    assert body["model_version"] == "local:tiny-ckpt"
    assert body["crop_size"] == CROP and body["threshold"] == 0.5 and body["device"] == "cpu"


def test_health_says_since_when_the_model_answers(service: ServeApp) -> None:
    body = service.http.get("/health").json()
    loaded_at = datetime.fromisoformat(body["model_loaded_at"])
    assert loaded_at.utcoffset() == timedelta(0) and loaded_at <= datetime.now(timezone.utc)
    assert body["registry"] is None and body["detail"] is None, "a checkpoint from disk follows no registry"


def test_predict_answers_the_original_contract(service: ServeApp) -> None:
    response = service.predict(jpeg(seed=3), key=KEY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) >= {"prediction", "probability", "confidence", "inference_time_ms", "model_version"}
    assert 0.0 <= body["probability"] <= 1.0
    assert body["prediction"] == ("ai_generated" if body["probability"] >= body["threshold"] else "real")
    assert body["confidence"] in {"low", "medium", "high"}
    assert body["inference_time_ms"] > 0
    assert body["model_version"] == "local:tiny-ckpt"
    again = service.predict(jpeg(seed=3), key=KEY).json()
    assert again["probability"] == pytest.approx(body["probability"], abs=1e-5), "same image, same answer"


def test_batch_answers_each_file_and_a_bad_file_fails_alone(service: ServeApp) -> None:
    files = [
        ("files", ("a.jpg", jpeg(seed=1), "image/jpeg")),
        ("files", ("notes.jpg", hostile.TEXT, "image/jpeg")),
        ("files", ("b.png", hostile.encode(hostile.noise(90, 70), "PNG"), "image/png")),
    ]
    response = service.http.post("/predict/batch", files=files, headers={"X-API-Key": KEY})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["total"], body["succeeded"], body["failed"]) == (3, 2, 1)
    first, bad, last = body["results"]
    assert first["filename"] == "a.jpg" and first["prediction"] in {"real", "ai_generated"} and first["error"] is None
    assert bad["filename"] == "notes.jpg" and bad["error"] == "not_an_image" and bad["prediction"] is None
    assert last["filename"] == "b.png" and 0 <= last["probability"] <= 1


def test_batch_refuses_more_files_than_the_limit(service: ServeApp) -> None:
    files = [("files", (f"{i}.jpg", jpeg(64, 64, seed=i), "image/jpeg")) for i in range(5)]
    assert_error(service.http.post("/predict/batch", files=files, headers={"X-API-Key": KEY}), 413, "too_many_files")


def test_explain_adds_a_gradcam_png(service: ServeApp) -> None:
    response = service.predict(jpeg(seed=5), key=KEY, route="/predict/explain")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["prediction"] in {"real", "ai_generated"} and body["heatmap_format"] == "png"
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_base64"])))
    assert heatmap.format == "PNG" and heatmap.size == (CROP, CROP) == (body["crop_size"],) * 2


def test_docs_and_openapi_describe_the_upload(service: ServeApp) -> None:
    assert "text/html" in service.http.get("/docs").headers["content-type"]
    spec = service.http.get("/openapi.json").json()
    for route in ("/predict", "/predict/batch", "/predict/explain"):
        assert "multipart/form-data" in spec["paths"][route]["post"]["requestBody"]["content"]
    assert {"/health", "/healthz", "/metrics"} <= set(spec["paths"])


def test_unknown_route_and_method_use_the_error_shape(service: ServeApp) -> None:
    assert_error(service.http.get("/nope"), 404, "not_found")
    assert_error(service.http.get("/predict"), 405, "method_not_allowed")


# ---------------------------------------------------------------------------------------------- bad inputs
def _gif() -> bytes:
    return hostile.encode(hostile.noise(20, 20).convert("P"), "GIF")


BAD_FILES = [
    ("text named .jpg", lambda: hostile.TEXT, "photo.jpg", 400, "not_an_image"),
    ("html", lambda: hostile.HTML, "page.jpg", 400, "not_an_image"),
    ("pdf", lambda: hostile.PDF, "scan.png", 400, "not_an_image"),
    ("zero bytes", lambda: b"", "empty.jpg", 400, "empty"),
    ("truncated jpeg", lambda: hostile.truncated(jpeg(seed=9), 0.4), "cut.jpg", 400, ("truncated", "corrupt")),
    ("broken png data", hostile.png_broken_idat, "broken.png", 400, ("truncated", "corrupt")),
    ("png pixel bomb", hostile.png_bomb, "bomb.png", 413, "too_many_pixels"),
    ("jpeg claiming 40000x40000", lambda: hostile.jpeg_claiming(40_000, 40_000), "huge.jpg", 413, "too_many_pixels"),
    ("svg", lambda: hostile.SVG, "logo.svg", 415, "unsupported_type"),
    ("gif", _gif, "anim.gif", 415, "unsupported_type"),
    ("oversize", lambda: b"\xff\xd8\xff" + bytes(MAX_BYTES), "big.jpg", 413, "too_large"),
]


@pytest.mark.parametrize(
    "make, filename, status, error", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_bad_input_gets_its_4xx(service: ServeApp, make, filename: str, status: int, error) -> None:
    assert_error(service.predict(make(), filename=filename, key=KEY), status, error)
    assert service.http.get("/health").status_code == 200


def test_requests_that_are_not_an_upload(service: ServeApp) -> None:
    headers = {"X-API-Key": KEY}
    raw = service.http.post("/predict", content=jpeg(), headers={**headers, "Content-Type": "image/jpeg"})
    assert_error(raw, 415, "unsupported_media_type")
    as_json = service.http.post("/predict", json={"file": "photo.jpg"}, headers=headers)
    assert_error(as_json, 415, "unsupported_media_type")
    other_field = service.http.post("/predict", files={"image": ("a.jpg", jpeg())}, headers=headers)
    assert_error(other_field, 400, "missing_file")
    unterminated = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n' + jpeg()
    broken = service.http.post(
        "/predict", content=unterminated, headers={**headers, "Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert_error(broken, 400, "bad_multipart")


def test_the_part_content_type_is_not_trusted(service: ServeApp) -> None:
    assert service.predict(jpeg(), filename="photo.txt", content_type="text/plain", key=KEY).status_code == 200


ODD_IMAGES = {
    "cmyk jpeg": lambda: hostile.encode(Image.new("CMYK", (90, 70), (0, 120, 255, 10)), "JPEG"),
    "16-bit grey png": lambda: hostile.encode(
        Image.fromarray(np.linspace(0, 65535, 80 * 60, dtype=np.uint16).reshape(60, 80)), "PNG"
    ),
    "16-bit rgb png": lambda: hostile.png_rgb16(80, 60),
    "rgba png": lambda: hostile.encode(Image.new("RGBA", (70, 70), (255, 0, 0, 90)), "PNG"),
    "palette png with transparency": hostile.palette_with_transparency,
    "exif-rotated jpeg": hostile.exif_rotated_jpeg,
    "animated png": lambda: hostile.animated("PNG"),
    "animated webp": lambda: hostile.animated("WEBP"),
    "greyscale jpeg": lambda: hostile.encode(hostile.noise(80, 80).convert("L"), "JPEG"),
    "1x1 png": lambda: hostile.encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    "3000x40 panorama": lambda: jpeg(3000, 40),
}


@pytest.mark.parametrize("make", list(ODD_IMAGES.values()), ids=list(ODD_IMAGES))
def test_odd_but_valid_images_are_answered(service: ServeApp, make) -> None:
    response = service.predict(make(), key=KEY)
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["probability"] <= 1.0


def test_no_input_killed_a_replica(service: ServeApp) -> None:
    split = model_deployment(APP) == "DetectorDeployment"
    assert running_replicas(APP, "IngressDeployment") == (2 if split else 1)
    if split:
        assert running_replicas(APP, "DetectorDeployment") == 1
    assert service.metrics().count("predictions_total") > 0
    assert metric_value(service.metrics(), "predictions_total", status="500") == 0, "no input may produce a 500"


def _raw_upload(port: int, headers: list[str], chunks, max_send: int) -> tuple[str, int]:
    """Send a request by hand, stopping at the first byte of a response; returns (status line, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        sock.sendall(("\r\n".join(headers) + "\r\n\r\n").encode())
        sent, reply = 0, b""
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or sent >= max_send:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        sock.settimeout(30)
        while b"\r\n" not in reply:
            data = sock.recv(4096)
            if not data:
                break
            reply += data
        return reply.split(b"\r\n", 1)[0].decode(), sent
    finally:
        sock.close()


def _endless_upload(piece: int = 64 * 1024):
    yield b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n\xff\xd8\xff'
    block = bytes(piece)
    while True:
        yield block


def test_a_1gb_upload_is_refused_without_reading_it(service: ServeApp) -> None:
    port = int(service.url.rsplit(":", 1)[1])
    common = [
        "POST /predict HTTP/1.1",
        "Host: 127.0.0.1",
        f"X-API-Key: {KEY}",
        "Content-Type: multipart/form-data; boundary=xyz",
    ]
    status, sent = _raw_upload(port, common + [f"Content-Length: {1 << 30}"], _endless_upload(), max_send=64 << 20)
    assert " 413 " in status + " ", status
    # what the sockets and HAProxy buffer before the refusal reaches the client: about 16 MiB on this machine
    assert sent < 32 << 20, f"sent {sent:,} bytes of a declared 1 GB before the refusal"

    def chunked():
        for chunk in _endless_upload():
            yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"

    status, sent = _raw_upload(port, common + ["Transfer-Encoding: chunked"], chunked(), max_send=256 << 20)
    assert " 413 " in status + " ", status
    assert sent < 64 << 20, f"sent {sent:,} bytes of an undeclared 1 GB stream before the refusal"
    assert service.http.get("/health").status_code == 200


# ---------------------------------------------------------------------------------------- batching, metrics
async def _concurrent(url: str, images: list[bytes], key: str) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as client:
        return await asyncio.gather(
            *(
                client.post("/predict", files={"file": ("p.jpg", data, "image/jpeg")}, headers={"X-API-Key": key})
                for data in images
            )
        )


def test_concurrent_requests_are_batched(service: ServeApp) -> None:
    before = service.metrics()
    images = [jpeg(200, 160, seed=i) for i in range(48)]
    responses = asyncio.run(_concurrent(service.url, images, BATCH_KEY))
    assert [r.status_code for r in responses] == [200] * len(images)

    def batched() -> tuple[float, float] | None:
        text = service.metrics()
        batches = metric_value(text, "prediction_batch_size_count") - metric_value(
            before, "prediction_batch_size_count"
        )
        images_seen = metric_value(text, "prediction_batch_size_sum") - metric_value(
            before, "prediction_batch_size_sum"
        )
        return (batches, images_seen) if images_seen >= len(images) else None

    batches, images_seen = wait_until(batched, 10, what="the detector's batch metrics")
    # images_seen may include a straggler of an earlier test whose counts arrived after `before` was read
    assert batches < images_seen - 1, f"{images_seen:.0f} images ran in {batches:.0f} batches: no batching"


def test_metrics_add_up_across_ingress_replicas(service: ServeApp) -> None:
    def ok_count(text: str) -> float:
        return metric_value(text, "predictions_total", status="200")

    before = service.metrics()
    count = 20
    for i in range(count):
        assert service.predict(jpeg(96, 96, seed=100 + i), key=KEY).status_code == 200
    assert_error(service.predict(hostile.TEXT, key=KEY), 400, "not_an_image")

    def errors(text: str) -> float:
        return metric_value(text, "prediction_errors_total", type="not_an_image")

    def latencies(text: str) -> float:
        return metric_value(text, "prediction_latency_seconds_count", route="predict")

    def settled() -> str | None:
        text = service.metrics()
        done = (
            ok_count(text) - ok_count(before) >= count
            and errors(text) > errors(before)
            and latencies(text) - latencies(before) >= count + 1
        )
        return text if done else None

    after = wait_until(settled, 10, what="every replica's counters to arrive")
    assert ok_count(after) - ok_count(before) == count, "each request counted exactly once"
    assert errors(after) - errors(before) == 1
    assert latencies(after) - latencies(before) == count + 1
    assert metric_value(after, "prediction_probability_count") >= count
    model_replicas = running_replicas(APP, model_deployment(APP))
    assert metric_value(after, "model_loads_total", result="ok") == model_replicas, "one load per model replica"


# ----------------------------------------------------------------------------------------------------- guards
def test_api_keys_guard_the_prediction_routes_only(service: ServeApp) -> None:
    assert_error(service.predict(jpeg()), 401, "unauthorized")
    assert_error(service.predict(jpeg(), key="not-a-key"), 401, "unauthorized")
    assert_error(service.http.post("/predict/batch", files=[("files", ("a.jpg", jpeg()))]), 401, "unauthorized")
    assert service.predict(jpeg(), key=KEY).status_code == 200
    for route in ("/health", "/healthz", "/metrics", "/docs"):
        assert service.http.get(route).status_code == 200, route


async def _until_limited(url: str, key: str, limit: int) -> tuple[int, httpx.Response | None]:
    """Cheap requests (refused after the guard: not an upload) until the first 429."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        sent = 0
        while sent < limit:
            wave = await asyncio.gather(
                *(
                    client.post("/predict", content=b"x", headers={"X-API-Key": key, "Content-Type": "text/plain"})
                    for _ in range(10)
                )
            )
            for response in wave:
                sent += 1
                if response.status_code == 429:
                    return sent, response
                assert response.status_code == 415, response.text
        return sent, None


def test_rate_limit_per_key(service: ServeApp) -> None:
    # State is per ingress replica (see serving/guards.py): with two replicas a key gets between 1x and 2x its limit.
    sent, limited = asyncio.run(_until_limited(service.url, LIMITED_KEY, limit=2 * RATE + 40))
    assert limited is not None, f"no 429 after {sent} requests at {RATE}/min"
    assert RATE < sent <= 2 * RATE + 10
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert service.predict(jpeg(), key=KEY).status_code == 200, "another key keeps its own budget"


# -------------------------------------------------------------------------------------------------- the client
def test_aipd_predict_prints_verdicts_and_fails_on_a_bad_file(service: ServeApp, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from aipd.cli import app as cli

    good, bad = tmp_path / "shoe.jpg", tmp_path / "notes.jpg"
    good.write_bytes(jpeg(seed=11))
    bad.write_bytes(hostile.TEXT)
    common = ["--url", service.url, "--api-key", KEY]

    one = CliRunner().invoke(cli, ["predict", str(good), *common], env={"COLUMNS": "250"})
    assert one.exit_code == 0, one.output
    assert "shoe.jpg" in one.output and "local:tiny-ckpt" in one.output

    both = CliRunner().invoke(cli, ["predict", str(good), str(bad), "--json", *common])
    assert both.exit_code == 1, "a refused file makes the command fail"
    rows = [json.loads(line) for line in both.stdout.splitlines() if line.startswith("{")]
    assert [row["file"] for row in rows] == [str(good), str(bad)]
    assert rows[0]["prediction"] in {"real", "ai_generated"} and rows[1]["error"] == "not_an_image"

    refused = CliRunner().invoke(cli, ["predict", str(good), "--url", service.url, "--api-key", "wrong"])
    assert refused.exit_code == 1 and "unauthorized" in refused.output


# ------------------------------------------------------------------------- live reconfigure (last: it swaps the model)
def test_reconfigure_changes_batching_and_model_live(service: ServeApp, tmp_path: Path) -> None:
    """What `serve deploy` with a new detector user_config triggers, called here through the detector's handle."""
    from ray import serve

    new = make_checkpoint(tmp_path / "tiny-ckpt-2", seed=2)
    loaded_before = service.http.get("/health").json()["model_loaded_at"]
    detector = serve.get_deployment_handle(model_deployment(APP), app_name=APP)
    detector.reconfigure.remote(
        {"model_uri": str(new), "max_batch_size": 2, "batch_wait_timeout_s": 0.05, "champion_poll_s": 0}
    ).result()
    wait_until(
        lambda: service.http.get("/health").json()["model_version"] == "local:tiny-ckpt-2",
        30,
        what="the new model to be swapped in",
    )
    assert service.http.get("/health").json()["model_loaded_at"] > loaded_before
    before = service.metrics()
    responses = asyncio.run(_concurrent(service.url, [jpeg(120, 90, seed=i) for i in range(16)], BATCH_KEY))
    assert {r.status_code for r in responses} == {200}
    assert {r.json()["model_version"] for r in responses} == {"local:tiny-ckpt-2"}

    def delta(text: str, name: str, **labels: str) -> float:
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    def counted() -> str | None:
        text = service.metrics()
        return text if delta(text, "prediction_batch_size_sum") >= 16 else None

    after = wait_until(counted, 10, what="the batch metrics")
    batches = delta(after, "prediction_batch_size_count")
    assert delta(after, "prediction_batch_size_bucket", le="2.0") == batches, "no batch above the new max of 2"
    assert batches < delta(after, "prediction_batch_size_sum"), "batches of 2 still form"
