"""Drift that acts, end to end with the real peers: photos far from the training baseline make a real Prometheus fire
the drift alert of cluster/monitoring/rules, a real Alertmanager (configured like cluster/monitoring/alertmanager.yml)
delivers it to the service's webhook, the service submits a retraining job to the Ray cluster through Ray's job API,
the job trains on the configured labelled data and registers its model as the challenger, and the canary starts.

What the test changes in the shipped files is only time and place: the alerts wait 0 s instead of 30 min and judge
20 photos instead of 200, the baseline says the champion flagged nothing, and every address is on this machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import free_port, jpeg, make_checkpoint, undeploy, wait_until, write_learnable_dataset
from tests.ops.promql import MONITORING, prometheus, rule_files

pytestmark = pytest.mark.slow

APP = "retrain"
PERCENT = 30.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed: apt-get install -y prometheus prometheus-alertmanager (make test does)")
    return path


def _rules(root: Path) -> list[str]:
    """The shipped rules, with the drift alerts firing at once on a short stream, and a baseline of 'nothing
    flagged' that any stream of mixed photos is far from."""
    paths = []
    for path in rule_files():
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in ("AipdPredictionDrift", "AipdVerdictShareDrift"):
                    rule["for"] = "0s"
                    rule["expr"] = rule["expr"].replace(">= 200", ">= 20")
                if rule.get("record") == "aipd:baseline:prediction_probability_mean":
                    rule["expr"] = "vector(0.02)"
                if rule.get("record") == "aipd:baseline:ai_generated_ratio":
                    rule["expr"] = "vector(0.0)"
        out = root / path.name
        out.write_text(yaml.safe_dump(rules, sort_keys=False))
        paths.append(str(out))
    return paths


def _start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def peers(tmp_path: Path, serve_port: int):
    """Alertmanager and Prometheus on free ports, watching the session's Serve port; yields Alertmanager's URL once
    both answer."""
    alertmanager_binary, prom_binary = _binary("prometheus-alertmanager"), prometheus() or _binary("prometheus")
    service_port, am_port, prom_port = serve_port, free_port(), free_port()
    alertmanager = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    alertmanager["route"].update(group_wait="1s", group_interval="1s")
    hook = next(r for r in alertmanager["receivers"] if r.get("webhook_configs"))["webhook_configs"][0]
    hook["url"] = f"http://127.0.0.1:{service_port}/alerts"
    hook.pop("http_config")  # the test's service runs without API keys
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(alertmanager, sort_keys=False))
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = _rules(tmp_path)
    config["alerting"]["alertmanagers"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{am_port}"]}]
    config["scrape_configs"] = [
        {"job_name": "aipd", "metrics_path": "/metrics", "static_configs": [{"targets": [f"127.0.0.1:{service_port}"]}]}
    ]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    processes = [
        _start(
            [
                alertmanager_binary,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",  # one instance: no gossip port
            ],
            tmp_path / "alertmanager.log",
        ),
        _start(
            [
                prom_binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            tmp_path / "prometheus.log",
        ),
    ]
    try:
        for url in (f"http://127.0.0.1:{am_port}/-/ready", f"http://127.0.0.1:{prom_port}/-/ready"):
            wait_until(lambda url=url: _answers(url), 60, what=url)
        yield f"http://127.0.0.1:{am_port}"
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def another_cluster_made_last() -> None:
    """The machine's Ray address file names a cluster made after this one and gone since, as when two clusters run on
    one machine: Ray's job supervisor resolves a job's address from that file, so the job must be told its own."""
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    kept = address_file.read_text() if address_file.exists() else None
    address_file.write_text(f"127.0.0.1:{free_port()}")
    yield
    if kept is None:
        address_file.unlink(missing_ok=True)
    else:
        address_file.write_text(kept)


def test_a_drift_alert_retrains_on_the_cluster_and_starts_the_new_model_as_a_canary(
    deploy, peers: str, tmp_path: Path, another_cluster_made_last: None
) -> None:
    import mlflow

    from app.config import Settings
    from app.registry import log_detector, set_alias, setup_mlflow
    from app.rollout import current_rollout
    from serving.config import AppArgs
    from tests.helpers import ServeApp

    alertmanager = peers
    data = write_learnable_dataset(tmp_path / "feedback", per_class=24, size=64)
    settings = Settings(
        work_dir=tmp_path / "work",
        train={"epochs": 2, "batch_size": 8, "crop_size": 48, "num_workers": 1, "use_gpu": False},
        serve={
            "rate_limit_per_minute": 0,
            "cache_max_entries": 0,
            "champion_poll_s": 0.5,
            "retrain_data": str(data),
            "retrain_percent": PERCENT,
            "ingress_max_replicas": 1,
            "detector_max_replicas": 1,
        },
    )
    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    first = log_detector(settings, make_checkpoint(tmp_path / "ckpt"), run_id=run.info.run_id, tags={}).version
    set_alias(settings, first)
    app: ServeApp = deploy(APP, settings, AppArgs(autoscaling={}))
    try:
        wait_until(lambda: app.http.get("/health").status_code == 200, 60, what="the champion")
        sent = iter(range(5000, 10_000))

        def stream(n: int) -> None:
            """Mixed photos, half of them called AI by an untrained model: far from "nothing flagged". A stream over
            several scrapes, since Prometheus counts no increase in a series' first sample."""
            for _ in range(n):
                assert app.predict(jpeg(64, 64, seed=next(sent))).status_code == 200

        def retraining() -> dict | None:
            return app.http.get("/rollout").json().get("retraining")

        def streamed_until_retraining() -> dict | None:
            stream(4)
            return retraining()

        job = wait_until(
            streamed_until_retraining, 120, interval_s=0.5, what="the drift alert to reach the webhook and start a job"
        )
        assert job["job"] and "drift" in job["reason"], job
        rollout = wait_until(lambda: current_rollout(settings), 300, interval_s=2.0, what="the retrained challenger")
        assert rollout.mode == "canary" and rollout.percent == PERCENT and rollout.version != first
        wait_until(
            lambda: (app.http.get("/rollout").json()["rollout"] or {}).get("version") == rollout.version,
            30,
            what="the service to start the canary",
        )
        # the job registers its challenger before it prints its report and stops its Ray driver: it ends soon after
        wait_until(lambda: retraining()["state"] == "SUCCEEDED", 120, interval_s=1.0, what="the job to succeed")
        alerts = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=5).json()
        assert {a["labels"]["alertname"] for a in alerts} & {"AipdPredictionDrift", "AipdVerdictShareDrift"}
        versions = {app.predict(jpeg(48, 48, seed=7000 + i)).json()["model_version"] for i in range(60)}
        assert versions == {first, rollout.version}, "the canary answers its share"
    finally:
        from app.rollout import abort

        abort(settings, "test over")
        undeploy(APP)
        time.sleep(0.1)
