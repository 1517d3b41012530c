"""The model registry goes away while the service runs: a real `mlflow server` process, the registry the service
follows (`models:/aipd-detector@champion`), is stopped under a trickle of predictions, then started again on the same
port and store, and a new champion is registered."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from aipd.trickle import Trickle
from tests.helpers import ServeApp, free_port, jpeg, make_checkpoint, undeploy, wait_until, with_serve

pytestmark = pytest.mark.slow

APP = "registry-down"
POLL_S = 0.5
# The detector probes the registry at every poll and the probe fails in seconds; MLflow's client alone would retry
# for minutes.
NOTICE_WITHIN_S = 30
OUTAGE_S = 5.0  # predictions keep coming this long after the service has noticed


def publish(settings, root: Path, seed: int) -> str:
    """Register a new tiny checkpoint through the server and point `champion` at it."""
    import mlflow

    from app.registry import log_detector, set_alias, setup_mlflow

    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    checkpoint = make_checkpoint(root / f"ckpt-{seed}", seed=seed)
    version = log_detector(settings, checkpoint, run_id=run.info.run_id, tags={"seed": seed}).version
    set_alias(settings, version)
    return version


def answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_registry_down_keeps_serving_reports_it_and_picks_up_the_champion_moved_meanwhile(
    deploy, tmp_path: Path, restore_mlflow_uris: None
) -> None:
    """Fault: the MLflow server behind the model registry (a real `mlflow server` process over a SQLite store) is
    stopped while the service answers a steady trickle of predictions, then started again on the same port and store.

    May be lost: nothing. Every request is answered 200 by the model already loaded; `/health` stays 200 and says
    `registry: unreachable` with the reason within a bounded time; once the server is back, a champion registered
    then is served without a failed request.
    """
    from app.config import Settings
    from app.mlflow_server import start_mlflow_server
    from serving.config import AppArgs

    work = tmp_path / "work"
    store = Settings(work_dir=work)  # the server's SQLite store and artifact folder
    port = free_port()
    log_path = tmp_path / "mlflow-server.log"
    log = log_path.open("a")
    server = start_mlflow_server(store, port, log=log, log_path=log_path).wait_until_up()
    settings = Settings(
        work_dir=work,
        mlflow_tracking_uri=server.url,
        serve={
            "max_batch_size": 4,
            "rate_limit_per_minute": 0,
            "ingress_min_replicas": 1,
            "ingress_max_replicas": 1,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
        },
    )
    service: ServeApp | None = None
    try:
        old = publish(settings, tmp_path, seed=1)
        service = deploy(APP, with_serve(settings, champion_poll_s=POLL_S), AppArgs(autoscaling={}))
        health = service.http.get("/health").json()
        assert health["model_version"] == old and health["registry"] == "reachable", health
        assert health["detail"] is None and health["model_loaded_at"] is not None

        with Trickle(service.url, [jpeg(160, 120, seed=i) for i in range(4)], interval_s=0.2) as trickle:
            wait_until(lambda: len(trickle.answers) >= 5, 60, what="the first predictions")

            server.process.terminate()
            wait_until(lambda: not answers(server.url), 30, interval_s=0.05, what="the mlflow server to stop")
            down_at = time.time()  # wall-clock, like the trickle's answers
            unreachable = wait_until(
                lambda: _health_if(service, lambda body: body["registry"] == "unreachable"),
                NOTICE_WITHIN_S,
                interval_s=0.1,
                what="/health to report the registry unreachable",
            )
            noticed_s = time.time() - down_at
            assert unreachable["status"] == "healthy" and unreachable["state"] == "ok"
            assert unreachable["model_version"] == old and unreachable["model_loaded_at"] == health["model_loaded_at"]
            assert "model registry unreachable" in unreachable["detail"], unreachable
            assert f"cannot reach the MLflow server at {server.url}" in unreachable["detail"], unreachable
            server.stop()  # reap the stopped server's processes
            time.sleep(OUTAGE_S)
            during_outage = trickle.versions_since(down_at)

            restarting = time.monotonic()
            server = start_mlflow_server(store, port, log=log, log_path=log_path).wait_until_up()
            back_at = time.monotonic()
            wait_until(
                lambda: _health_if(service, lambda body: body["registry"] == "reachable"),
                NOTICE_WITHIN_S,
                interval_s=0.1,
                what="/health to report the registry reachable again",
            )
            reachable_s = time.monotonic() - back_at
            new = publish(settings, tmp_path, seed=2)
            published_at = time.time()
            wait_until(
                lambda: trickle.versions_since(published_at)[-3:] == [new] * 3,
                120,
                what=f"the service to answer with version {new}",
            )
            switched_s = time.time() - published_at
            switched = service.http.get("/health").json()

        failures = trickle.failures()
        assert failures == [], f"{len(failures)} failed requests: {failures[:5]}"
        assert len(during_outage) >= 10 and set(during_outage) == {old}, during_outage
        versions = [answer.outcome for answer in trickle.answers]
        first_new = versions.index(new)
        assert set(versions[:first_new]) == {old} and set(versions[first_new:]) == {new}, "one switch, no way back"
        assert switched["model_version"] == new and switched["registry"] == "reachable" and switched["detail"] is None
        assert switched["model_loaded_at"] > health["model_loaded_at"]
        print(
            f"\nregistry down: {len(trickle.answers)} predictions, none failed ({len(during_outage)} while it was "
            f"down); /health said unreachable {noticed_s:.1f} s after the server stopped; the server restarted in "
            f"{back_at - restarting:.1f} s and /health said reachable {reachable_s:.1f} s later; version {new} "
            f"answered {switched_s:.1f} s after it became champion"
        )
    finally:
        if service is not None:
            undeploy(APP)
        server.stop()
        log.close()


def _health_if(service: ServeApp, condition) -> dict | None:
    """The /health body when it answers 200 and meets `condition`; a loaded model must keep /health at 200."""
    response = service.http.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    return body if condition(body) else None
