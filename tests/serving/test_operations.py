"""The service as an operator runs it, against the real service on Serve's default data path (HAProxy): rate limits
per identity a client cannot forge, and the answer cache, in-process and in a real Redis that is killed under
traffic."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServeApp, free_port, jpeg, make_checkpoint, model_deployment, undeploy, wait_until, with_serve

pytestmark = pytest.mark.slow

APP = "operations"
KEY_A, KEY_B = "key-a", "key-b"
RATE = 60


def _deploy(deploy, tmp_path: Path, name: str, **serve: object) -> ServeApp:
    from app.config import Settings
    from serving.config import AppArgs

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    base = {
        "model_uri": str(checkpoint),
        "champion_poll_s": 0,
        "ingress_min_replicas": 1,
        "ingress_max_replicas": 1,
        "detector_min_replicas": 1,
        "detector_max_replicas": 1,
    }
    settings = with_serve(Settings(work_dir=tmp_path / "work"), **{**base, **serve})
    return deploy(name, settings, AppArgs(autoscaling={}))


def _client(url: str, address: str) -> httpx.Client:
    """A client whose connections come from ``address`` (127.0.0.x): another machine, as far as TCP can tell."""
    return httpx.Client(base_url=url, timeout=60.0, transport=httpx.HTTPTransport(local_address=address))


def _burst(client: httpx.Client, n: int, headers: dict[str, str] | None = None) -> list[int]:
    photo = jpeg(64, 64, seed=1)
    return [
        client.post("/predict", files={"file": ("p.jpg", photo, "image/jpeg")}, headers=headers or {}).status_code
        for _ in range(n)
    ]


# ------------------------------------------------------------------------------------------------- rate limits
def test_without_keys_one_clients_burst_never_makes_another_wait(deploy, tmp_path: Path) -> None:
    """Behind HAProxy the service cannot tell clients apart, so without keys it limits nobody (it says so at start)
    instead of putting every client in the one bucket a single burst empties."""
    app = _deploy(deploy, tmp_path, APP, rate_limit_per_minute=RATE)
    try:
        with _client(app.url, "127.0.0.2") as a, _client(app.url, "127.0.0.3") as b:
            assert set(_burst(a, 90)) == {200}
            assert _burst(b, 5) == [200] * 5
            forged = _burst(a, 5, {"X-Forwarded-For": "203.0.113.9"})
            assert forged == [200] * 5
    finally:
        undeploy(APP)


def test_with_keys_each_key_has_its_own_limit_and_a_forged_address_buys_nothing(deploy, tmp_path: Path) -> None:
    from app.config import Settings
    from serving.config import AppArgs

    checkpoint = make_checkpoint(tmp_path / "ckpt")
    settings = with_serve(
        Settings(work_dir=tmp_path / "work", api_keys=[KEY_A, KEY_B]),
        model_uri=str(checkpoint),
        champion_poll_s=0,
        rate_limit_per_minute=RATE,
        ingress_min_replicas=1,
        ingress_max_replicas=1,
    )
    app = deploy(APP, settings, AppArgs(autoscaling={}))
    try:
        with _client(app.url, "127.0.0.2") as a, _client(app.url, "127.0.0.3") as b:
            first = _burst(a, 90, {"X-API-Key": KEY_A})
            assert first[: RATE - 5] == [200] * (RATE - 5) and first.count(429) >= 5, first
            # key A's bucket is empty: a claimed address of its own buys no more than asking plainly
            plain, forged = [], []
            for i in range(6):
                plain += _burst(a, 1, {"X-API-Key": KEY_A})
                forged += _burst(a, 1, {"X-API-Key": KEY_A, "X-Forwarded-For": f"198.51.100.{i}"})
            assert forged.count(200) <= plain.count(200) + 1, (plain, forged)
            assert _burst(b, 5, {"X-API-Key": KEY_B}) == [200] * 5, "key B keeps its own budget"
            limited = a.post("/predict", files={"file": ("p.jpg", jpeg(), "image/jpeg")}, headers={"X-API-Key": KEY_A})
            assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    finally:
        undeploy(APP)


# ---------------------------------------------------------------------------------------------- answer cache
def _predict(app: ServeApp, data: bytes) -> httpx.Response:
    response = app.predict(data)
    assert response.status_code == 200, response.text
    return response


def test_the_same_photo_again_is_answered_from_the_cache_and_a_new_model_never_gets_an_old_answer(
    deploy, tmp_path: Path
) -> None:
    from ray import serve

    from tests.helpers import metric_value

    app = _deploy(deploy, tmp_path, APP)
    try:
        photo = jpeg(640, 480, seed=5)
        first, second = _predict(app, photo).json(), _predict(app, photo).json()
        assert first["cached"] is False and second["cached"] is True
        fields = ("prediction", "probability", "confidence", "model_version", "threshold")
        assert {k: second[k] for k in fields} == {k: first[k] for k in fields}
        assert second["inference_time_ms"] <= first["inference_time_ms"] / 2
        text = app.metrics()
        assert metric_value(text, "cache_lookups_total", result="hit") >= 1
        assert metric_value(text, "cache_lookups_total", result="miss") >= 1

        # a new model (what a champion switch does): the old version's answer to the photo is never handed out again
        new = make_checkpoint(tmp_path / "ckpt-2", seed=2)
        detector = serve.get_deployment_handle(model_deployment(APP), app_name=APP)
        detector.reconfigure.remote({"model_uri": str(new), "champion_poll_s": 0}).result()
        wait_until(lambda: _predict(app, jpeg(seed=9)).json()["model_version"] == "local:ckpt-2", 60, what="ckpt-2")
        again = _predict(app, photo).json()
        assert again["model_version"] == "local:ckpt-2" and again["cached"] is False
        assert _predict(app, photo).json()["cached"] is True
    finally:
        undeploy(APP)


@pytest.fixture
def redis_server(tmp_path: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed: apt-get install -y redis-server (make test installs it)")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )

    def answers() -> bool:
        import redis

        try:
            return bool(redis.Redis(port=port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    wait_until(answers, 20, what="redis-server")
    yield process, f"redis://127.0.0.1:{port}/0"
    process.kill()
    process.wait(timeout=10)


def test_redis_shares_answers_and_its_death_under_traffic_fails_no_request(
    deploy, tmp_path: Path, redis_server
) -> None:
    process, url = redis_server
    app = _deploy(deploy, tmp_path, APP, cache_url=url)
    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=app.url, timeout=60.0) as client:
            i = 0
            while not stop.is_set():
                photo = jpeg(160, 120, seed=i % 4)  # four photos, each asked again and again
                statuses.append(client.post("/predict", files={"file": ("p.jpg", photo)}).status_code)
                i += 1

    try:
        photo = jpeg(320, 240, seed=7)
        assert _predict(app, photo).json()["cached"] is False
        assert _predict(app, photo).json()["cached"] is True
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        wait_until(lambda: len(statuses) >= 10, 60, what="traffic")
        os.kill(process.pid, signal.SIGKILL)
        killed_at = len(statuses)
        wait_until(lambda: len(statuses) >= killed_at + 30, 120, what="traffic after Redis died")
        stop.set()
        thread.join(timeout=60)
        assert set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
        assert _predict(app, photo).json()["cached"] is False, "with Redis gone every lookup is a miss"
    finally:
        stop.set()
        undeploy(APP)
        time.sleep(0.1)
