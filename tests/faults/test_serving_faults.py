"""Faults under serving load, against a real Serve application in the split layout (two ingress replicas in front of
two detector replicas, HAProxy in front of the ingress): a minute of steady load (the soak benchmark), a replica
process SIGKILLed mid-load, and the bad-input corpus sent at volume beside valid traffic. Each test says what the fault
may cost and checks that nothing else is lost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests import hostile_images as hostile
from tests.helpers import (
    ServeApp,
    jpeg,
    make_checkpoint,
    replica_pids,
    running_replicas,
    undeploy,
    wait_until,
    with_serve,
)

pytestmark = pytest.mark.slow

APP = "faults"
MAX_BYTES = 2 * 1024 * 1024
LOAD_S = 20.0
KILL_AT_S = 8.0
RECOVERY_S = 30.0
CLIENTS = 8  # closed-loop clients of the replica-kill tests, one keep-alive connection each


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory: pytest.TempPathFactory) -> ServeApp:
    from app.config import Settings
    from serving.config import AppArgs

    root = tmp_path_factory.mktemp("faults")
    settings = Settings(
        work_dir=root / "work",
        images={"max_bytes": MAX_BYTES, "max_pixels": 20_000_000},
        serve={
            "layout": "split",
            "model_uri": str(make_checkpoint(root / "tiny-ckpt", seed=1)),
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.005,
            "rate_limit_per_minute": 0,
            "ingress_min_replicas": 2,
            "ingress_max_replicas": 2,
            "detector_min_replicas": 2,
            "detector_max_replicas": 2,
        },
    )
    app = deploy(APP, with_serve(settings, champion_poll_s=0), AppArgs(autoscaling={}))
    wait_until(lambda: app.http.get("/health").status_code == 200, 60, what="the service to be ready")
    yield app
    undeploy(APP)


@dataclass
class Answer:
    kind: str  # "valid", or the name of the bad-input case
    started: float
    ended: float
    status: int  # 0: no HTTP answer (the connection was cut or refused)
    retry_after: str | None
    body: str


class ClosedLoop:
    """`len(uploads)` clients, each posting its own uploads back to back from a background thread until stopped;
    every answer is recorded with when it was sent and when it came back (time.monotonic)."""

    def __init__(self, url: str, uploads: list[list[tuple[str, str, bytes]]]) -> None:
        self.url, self.uploads = url, uploads
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, http: httpx.AsyncClient, uploads: list[tuple[str, str, bytes]]) -> None:
        n = 0
        while not self._stop.is_set():
            kind, filename, data = uploads[n % len(uploads)]
            n += 1
            started = time.monotonic()
            try:
                response = await http.post("/predict", files={"file": (filename, data, "image/jpeg")})
                answer = Answer(
                    kind, started, time.monotonic(), response.status_code, response.headers.get("Retry-After"), ""
                )
                if response.status_code != 200:
                    answer.body = response.text[:300]
            except httpx.HTTPError as err:
                answer = Answer(kind, started, time.monotonic(), 0, None, repr(err)[:300])
            self.answers.append(answer)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=len(self.uploads), max_keepalive_connections=len(self.uploads))
        async with httpx.AsyncClient(base_url=self.url, timeout=60.0, limits=limits) as http:
            await asyncio.gather(*(self._client(http, uploads) for uploads in self.uploads))

    def __enter__(self) -> ClosedLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def in_flight_at(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.started <= moment <= a.ended]

    def failures(self, kind: str = "valid") -> list[Answer]:
        return [a for a in self.answers if a.kind == kind and a.status != 200]


def test_a_60_second_soak_fails_nothing_and_leaks_nothing(service: ServeApp, tmp_path: Path) -> None:
    """Time as the fault: benchmarks/soak.py for 60 s at half the capacity its ramp measures (the 10-minute run is in
    /work/notes/issue15_note.md). May be lost: nothing; no request fails and the service's memory grows under 10%."""
    from benchmarks.soak import main

    out = tmp_path / "soak"
    code = main(["--url", service.url, "--app", APP, "--duration", "60", "--ramp-step", "2", "--out", str(out)])
    rows = (out / "soak.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and "rss_mb:DetectorDeployment-" in rows[0] and "rss_mb:haproxy-" in rows[0]
    assert (out / "soak.png").stat().st_size > 10_000
    assert code == 0, (out / "summary.txt").read_text()


def _valid_uploads(clients: int) -> list[list[tuple[str, str, bytes]]]:
    return [[("valid", "p.jpg", jpeg(160, 120, seed=c * 10 + i)) for i in range(4)] for c in range(clients)]


def _kill_one_replica_under_load(service: ServeApp, deployment: str, clients: int) -> tuple[ClosedLoop, float, float]:
    """Steady load for LOAD_S seconds, SIGKILL one replica of `deployment` after KILL_AT_S; returns the load, the kill
    time and the seconds until the deployment runs its full replica count again with the killed process gone."""
    before = replica_pids(APP, deployment)
    assert len(before) == 2, before
    victim = before[0]
    with ClosedLoop(service.url, _valid_uploads(clients)) as load:
        time.sleep(KILL_AT_S)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(LOAD_S - KILL_AT_S)

    def recovered() -> bool:
        pids = replica_pids(APP, deployment)
        return len(pids) == 2 and victim not in pids and running_replicas(APP, deployment) == 2

    wait_until(recovered, RECOVERY_S, interval_s=0.5, what=f"{deployment} back to two replicas")
    recovery_s = time.monotonic() - killed_at
    assert service.predict(jpeg(seed=99)).status_code == 200
    return load, killed_at, recovery_s


def _report(name: str, load: ClosedLoop, killed_at: float, recovery_s: float) -> None:
    failures = load.failures()
    print(
        f"\n{name}: {len(load.answers)} requests, {len(load.in_flight_at(killed_at))} in flight at the kill, "
        f"{len(failures)} failed {sorted({(a.status, a.body[:60]) for a in failures})}, started at "
        f"{sorted(round(a.started - killed_at, 2) for a in failures)} s from the kill, recovered in {recovery_s:.1f} s"
    )


def test_a_detector_replica_killed_under_load(service: ServeApp) -> None:
    """Fault: SIGKILL of one of the two detector replicas during steady load (8 closed-loop clients, 20 s).

    May be lost: the requests in flight on that replica at the kill; each gets 503 with Retry-After (never a 500 or a
    cut connection). Every other request answers 200, and Serve has two detector replicas again within 30 s.
    """
    load, killed_at, recovery_s = _kill_one_replica_under_load(service, "DetectorDeployment", clients=CLIENTS)
    _report("detector", load, killed_at, recovery_s)
    failures = load.failures()
    assert len(load.answers) > 100
    assert all(a.status == 503 and a.retry_after for a in failures), failures
    assert all(a.started <= killed_at <= a.ended for a in failures), "only requests in flight at the kill may fail"
    assert len(failures) <= len(load.in_flight_at(killed_at))


def test_an_ingress_replica_killed_under_load(service: ServeApp) -> None:
    """Fault: SIGKILL of one of the two ingress replicas (HAProxy in front of both) during steady load (8 keep-alive
    clients, 20 s).

    May be lost: the requests in flight on that replica at the kill, and a request HAProxy sends on a pooled
    connection to the dead replica before it has seen that connection close (on a loaded machine, a fraction of a
    second after the kill): at most one per client. HAProxy closes their connections without an answer, as it does
    for a request that is not the first on a keep-alive connection, so that the client retries; a request that was
    the first on its connection gets HAProxy's 502, which Serve's error page turns into a 500. Every other request
    answers 200, and Serve has two ingress replicas again within 30 s. benchmarks/RESULTS.md ("Faults") has the counts.
    """
    load, killed_at, recovery_s = _kill_one_replica_under_load(service, "IngressDeployment", clients=CLIENTS)
    _report("ingress", load, killed_at, recovery_s)
    failures = load.failures()
    assert len(load.answers) > 100
    closed = ("RemoteProtocolError", "ReadError")  # the connection ended with no answer: at an EOF, or reset
    assert all((a.status == 0 and a.body.startswith(closed)) or a.status == 500 for a in failures), failures
    assert all(a.ended >= killed_at for a in failures), "nothing fails before the kill"
    assert all(a.started <= killed_at + recovery_s for a in failures), "nothing fails once the replica is back"
    assert len(failures) <= CLIENTS


# The contract's bad inputs (tests/serving/test_contract.py) sent as photo uploads, with the status each must get.
BAD_STATUS = {
    **dict.fromkeys(("text", "html", "pdf", "empty", "truncated", "broken png"), 400),
    **dict.fromkeys(("png bomb", "jpeg claiming 40000x40000", "oversize"), 413),
    **dict.fromkeys(("svg", "gif"), 415),
}


def _bad_corpus() -> list[tuple[str, str, bytes]]:
    return [
        ("text", "photo.jpg", hostile.TEXT),
        ("html", "page.jpg", hostile.HTML),
        ("pdf", "scan.png", hostile.PDF),
        ("empty", "empty.jpg", b""),
        ("truncated", "cut.jpg", hostile.truncated(jpeg(seed=9), 0.4)),
        ("broken png", "broken.png", hostile.png_broken_idat()),
        ("png bomb", "bomb.png", hostile.png_bomb()),
        ("jpeg claiming 40000x40000", "huge.jpg", hostile.jpeg_claiming(40_000, 40_000)),
        ("svg", "logo.svg", hostile.SVG),
        ("gif", "anim.gif", hostile.encode(hostile.noise(20, 20).convert("P"), "GIF")),
        ("oversize", "big.jpg", b"\xff\xd8\xff" + bytes(MAX_BYTES)),
    ]


def test_bad_input_at_volume_beside_valid_traffic(service: ServeApp) -> None:
    """Fault: 32 clients sending the bad-input corpus (text, HTML, PDF, empty, truncated, broken PNG, a pixel bomb, a
    JPEG claiming 40000x40000, SVG, GIF, an oversize upload) concurrently with 32 clients sending valid photos.

    May be lost: nothing. Every valid request answers 200, every bad one gets its 4xx, no replica restarts.
    """
    before = {name: replica_pids(APP, name) for name in ("IngressDeployment", "DetectorDeployment")}
    corpus = _bad_corpus()
    uploads = _valid_uploads(32) + [corpus[c % len(corpus) :] + corpus[: c % len(corpus)] for c in range(32)]
    with ClosedLoop(service.url, uploads) as load:
        time.sleep(15.0)
    valid = [a for a in load.answers if a.kind == "valid"]
    bad = [a for a in load.answers if a.kind != "valid"]
    print(f"\nbad input: {len(valid)} valid, {len(bad)} bad requests")
    assert len(valid) > 50 and {a.kind for a in bad} == set(BAD_STATUS)
    assert load.failures() == [], load.failures()[:5]
    assert sorted({(a.kind, a.status) for a in bad}) == sorted(BAD_STATUS.items())
    assert {name: replica_pids(APP, name) for name in before} == before, "a replica restarted"
