"""A challenger beside the champion, against the real service following a real registry (SQLite MLflow): a canary's
share of distinct photos and the same arm for the same photo, promote and abort under a trickle of requests with none
failed, a shadow whose verdicts are the champion's inverted rolled back on its own, and what `/metrics`, `/rollout`
and `aipd rollout status --json` report."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from aipd.trickle import Trickle
from tests.helpers import ServeApp, invoke, jpeg, make_checkpoint, metric_value, undeploy, wait_until

pytestmark = pytest.mark.slow

APP = "rollout"
MIN_REQUESTS = 30


class Registry:
    def __init__(self, settings, root: Path) -> None:
        self.settings, self.root = settings, root
        self.seeds: dict[str, int] = {}  # version -> the seed of its tiny model

    def register(self, seed: int, invert: bool = False) -> str:
        """A tiny checkpoint as a new version (not champion); ``invert``: the same model with its logit negated, so
        its every verdict is the opposite of the seed's (what a model trained on inverted labels answers)."""
        import mlflow
        import torch

        from app.checkpoint_files import WEIGHTS_FILE
        from app.registry import log_detector, setup_mlflow

        experiment = setup_mlflow(self.settings)
        checkpoint = make_checkpoint(self.root / f"ckpt-{seed}-{invert}", seed=seed)
        if invert:
            state = torch.load(checkpoint / WEIGHTS_FILE, weights_only=True)
            last = max(key for key in state if key.startswith("head.") and key.endswith(".weight"))
            state[last], state[last.replace("weight", "bias")] = -state[last], -state[last.replace("weight", "bias")]
            torch.save(state, checkpoint / WEIGHTS_FILE)
        with mlflow.start_run(experiment_id=experiment) as run:
            pass
        version = log_detector(self.settings, checkpoint, run_id=run.info.run_id, tags={"seed": seed}).version
        self.seeds[version] = seed
        return version


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from app.config import Settings
    from app.registry import set_alias

    root = tmp_path_factory.mktemp("rollout")
    settings = Settings(
        work_dir=root / "work",
        serve={
            "rate_limit_per_minute": 0,
            "cache_max_entries": 0,  # every request meets a model: the shares are the models' own
            "champion_poll_s": 0.5,
            "rollout_min_requests": MIN_REQUESTS,
            # this module is about the shares and the disagreement rule: a fresh challenger's first batch of each new
            # size runs slower on a CPU (the trace specialises per size), and on a loaded machine its p99 may pass
            # the champion's by any margin
            "rollout_latency_margin": 1000.0,
            "ingress_min_replicas": 1,
            "ingress_max_replicas": 1,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
        },
    )
    registry = Registry(settings, root)
    set_alias(settings, registry.register(seed=1))
    return registry


@pytest.fixture(scope="module")
def service(deploy, registry: Registry) -> ServeApp:
    from serving.config import AppArgs

    app = deploy(APP, registry.settings, AppArgs(autoscaling={}))
    wait_until(lambda: app.http.get("/health").status_code == 200, 60, what="the champion to load")
    yield app
    undeploy(APP)


def _champion(registry: Registry) -> str:
    from app.registry import get_alias_version

    return get_alias_version(registry.settings).version


def _versions(service: ServeApp, photos: list[bytes]) -> list[str]:
    answers = [service.predict(photo) for photo in photos]
    assert {a.status_code for a in answers} == {200}
    return [a.json()["model_version"] for a in answers]


def _trial(service: ServeApp) -> dict | None:
    return service.http.get("/rollout").json()["rollout"]


def test_a_canary_takes_its_share_of_distinct_photos_and_the_same_photo_meets_the_same_model(
    service: ServeApp, registry: Registry
) -> None:
    from app.rollout import abort, start_rollout

    champion, challenger = _champion(registry), registry.register(seed=2)
    start_rollout(registry.settings, challenger, 20.0)
    try:
        wait_until(lambda: (_trial(service) or {}).get("version") == challenger, 30, what="the service to follow")
        photos = [jpeg(48, 48, seed=1000 + i) for i in range(400)]
        versions = _versions(service, photos)
        shares = Counter(versions)
        assert set(shares) == {champion, challenger}
        assert 0.10 <= shares[challenger] / len(photos) <= 0.30, shares
        again = _versions(service, photos[:40])
        assert again == versions[:40], "a photo sent again meets the model it met first"
        metrics = service.metrics()
        for version in (champion, challenger):
            assert metric_value(metrics, "predictions_total", status="200", version=version) > 0
            assert metric_value(metrics, "model_scores_total", version=version) > 0
        figures = service.http.get("/rollout").json()["versions"]
        assert figures[challenger]["requests"] >= shares[challenger] and figures[challenger]["error_rate"] == 0.0
    finally:
        abort(registry.settings, "test over")


def _only(trickle: Trickle, version: str, since: float, run: int = 16) -> bool:
    """The last ``run`` answers since ``since`` all came from ``version``: a run as long as the trickle's cycle of
    photos, so with a trial still on about half of them would have met the challenger."""
    versions = trickle.versions_since(since)
    return len(versions) >= run and set(versions[-run:]) == {version}


def test_promote_and_abort_switch_under_a_trickle_without_a_failed_request(
    service: ServeApp, registry: Registry
) -> None:
    from app.rollout import abort, last_ended, promote, start_rollout

    photos = [jpeg(48, 48, seed=2000 + i) for i in range(16)]
    first, promoted = _champion(registry), registry.register(seed=3)
    start_rollout(registry.settings, promoted, 50.0)
    with Trickle(service.url, photos, interval_s=0.05) as trickle:
        wait_until(lambda: promoted in trickle.versions_since(0), 60, what="the canary to answer")
        promote(registry.settings)
        switched = time.time()
        wait_until(lambda: _only(trickle, promoted, since=switched), 60, what="the promotion")
        aborted = registry.register(seed=4)
        start_rollout(registry.settings, aborted, 50.0)
        wait_until(lambda: aborted in trickle.versions_since(0), 60, what="the second canary to answer")
        abort(registry.settings, "not good enough")
        ended = time.time()
        wait_until(lambda: _only(trickle, promoted, since=ended), 60, what="the abort")
    assert trickle.failures() == [], trickle.failures()[:3]
    assert _champion(registry) == promoted != first
    ended_by = last_ended(registry.settings)
    assert (ended_by.outcome, ended_by.version, ended_by.reason) == ("aborted", aborted, "not good enough")
    assert _trial(service) is None


def test_a_shadow_that_disagrees_is_rolled_back_on_its_own_and_the_champion_answers_throughout(
    service: ServeApp, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.rollout import last_ended, start_rollout

    champion = _champion(registry)
    inverted = registry.register(seed=registry.seeds[champion], invert=True)  # the champion's model, verdicts inverted
    start_rollout(registry.settings, inverted, 100.0, shadow=True)
    wait_until(lambda: (_trial(service) or {}).get("mode") == "shadow", 30, what="the shadow to start")
    photos = [jpeg(48, 48, seed=3000 + i) for i in range(MIN_REQUESTS + 10)]
    assert set(_versions(service, photos)) == {champion}, "a shadow never answers"
    reached = time.monotonic()
    with Trickle(service.url, photos[:8], interval_s=0.1) as trickle:
        wait_until(lambda: _trial(service) is None, 60, what="the automatic rollback")
        took = time.monotonic() - reached
        # the rollback can come before the trickle's first answer: it must still answer, and by the champion
        wait_until(lambda: len(trickle.versions_since(0)) >= 5, 30, what="the trickle's answers after the rollback")
    ended = last_ended(registry.settings)
    assert ended.outcome == "rolled_back" and ended.version == inverted and "disagree" in ended.reason, ended
    assert took <= 60 and trickle.failures() == [] and set(trickle.versions_since(0)) == {champion}

    monkeypatch.setenv("AIPD_WORK_DIR", str(registry.settings.work_dir))  # the command reads the same registry
    result = invoke(_cli(), ["rollout", "status", "--json", "--url", service.url])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["champion"] == champion and report["rollout"] is None
    assert report["last_ended"]["outcome"] == "rolled_back"
    shadow = report["service"]["versions"][inverted]
    assert shadow["compared"] >= MIN_REQUESTS and shadow["agreement"] < 0.5


def _cli():
    from aipd.cli import app

    return app
