"""A real Prometheus, configured by cluster/monitoring/prometheus.yml and its rules, scraping a running Serve app
on a real two-node Ray cluster after some traffic: every target up, and every PromQL expression of the dashboards and
the rules evaluates and returns data.

Everything Ray runs in subprocesses (`cluster_up`, a deploy script), so this process never joins a second cluster
next to the session's one. The only changes to prometheus.yml are where things are on this machine: Ray's discovery
file of this cluster's session (not /tmp/ray's link, which another cluster on the machine may own), the service's
port, absolute rule paths, and one-second scrape and evaluation intervals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.helpers import free_port, jpeg, make_checkpoint, wait_until
from tests.ops.promql import (
    MONITORING,
    ROOT,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
    prometheus,
    promtool,
    recording_rule_names,
    rule_files,
    rule_queries,
)

pytestmark = pytest.mark.slow

KEY = "ops-key"
APP = "aipd"  # serving.config.APP_NAME: the application the rules and dashboards watch

_DEPLOY = """
import sys, ray
from ray import serve
from app.config import Settings
from serving.app_builder import build_application
from serving.config import AppArgs
from serving.deploy import run_app
address, port, checkpoint, work_dir, key, app_name = sys.argv[1:]
ray.init(address=address, log_to_driver=False, logging_level="ERROR")
serve.start(http_options={"host": "127.0.0.1", "port": int(port)})
settings = Settings(work_dir=work_dir, api_keys=[key], serve={
    "model_uri": checkpoint, "port": int(port), "max_batch_size": 8, "batch_wait_timeout_s": 0.02,
    "ingress_min_replicas": 1, "ingress_max_replicas": 1, "detector_min_replicas": 1, "detector_max_replicas": 1,
    "champion_poll_s": 0})
run_app(build_application(settings, AppArgs(autoscaling={}), num_gpus=0), app_name, timeout_s=240)
print("SESSION_DIR=" + ray._private.worker._global_node.get_session_dir_path())
"""


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}


def _send_traffic(url: str, wave: int) -> None:
    """Verdicts, a batch, an explanation, and refusals (400 not an image, 401 no key), so every series exists. Each
    wave sends photos of its own: a photo seen before is answered from the cache, and the model's series stay still."""
    headers = {"X-API-Key": KEY}
    seeds = 100 * wave
    with httpx.Client(base_url=url, timeout=60.0) as http:
        for seed in range(seeds, seeds + 6):
            response = http.post("/predict", files={"file": ("p.jpg", jpeg(seed=seed), "image/jpeg")}, headers=headers)
            assert response.status_code == 200, response.text
        batch = [("files", (f"b{i}.jpg", jpeg(seed=seeds + 20 + i), "image/jpeg")) for i in range(3)]
        assert http.post("/predict/batch", files=batch, headers=headers).status_code == 200
        assert (
            http.post(
                "/predict/explain", files={"file": ("e.jpg", jpeg(seed=seeds + 30), "image/jpeg")}, headers=headers
            ).status_code
            == 200
        )
        refused = http.post("/predict", files={"file": ("x.jpg", b"not an image", "image/jpeg")}, headers=headers)
        assert refused.status_code == 400
        assert http.post("/predict", files={"file": ("p.jpg", jpeg(), "image/jpeg")}).status_code == 401


def _test_config(session_dir: str, service_port: int, out: Path) -> Path:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(p) for p in rule_files()]
    config.pop("alerting", None)  # no Alertmanager here (tests/ops/test_retrain_on_drift.py has one)
    for job in config["scrape_configs"]:
        if job["job_name"] == "ray":
            sd = job["file_sd_configs"][0]
            sd["files"] = [str(Path(session_dir) / Path(sd["files"][0]).name)]
            sd["refresh_interval"] = "1s"
        elif job["job_name"] == "aipd":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


class Prometheus:
    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30.0)

    def query(self, expr: str) -> dict:
        body = self.http.get("/api/v1/query", params={"query": expr}).json()
        assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def samples(self, expr: str) -> list[float]:
        data = self.query(expr)
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(item["value"][1]) for item in data["result"]]

    def targets(self) -> list[dict]:
        return self.http.get("/api/v1/targets").json()["data"]["activeTargets"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """Two Ray nodes, the Serve application after traffic, and Prometheus scraping both: yields what the tests read."""
    from app.processes import cluster_processes
    from cluster.local_cluster import cluster_down, cluster_up

    if prometheus() is None or promtool() is None:
        pytest.skip("prometheus is not installed: apt-get install -y prometheus (make test installs it)")
    root = tmp_path_factory.mktemp("ops")
    work_dir = root / "work"
    checkpoint = make_checkpoint(root / "tiny-ckpt")
    cluster = cluster_up(work_dir, workers=1, cpus_per_node=4)
    prom_process = None
    try:
        port = free_port()
        deployed = subprocess.run(
            [sys.executable, "-c", _DEPLOY, cluster.address, str(port), str(checkpoint), str(work_dir), KEY, APP],
            env=_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        session_dir = next(
            line.split("=", 1)[1] for line in deployed.stdout.splitlines() if line.startswith("SESSION_DIR=")
        )
        service_url = f"http://127.0.0.1:{port}"
        assert "haproxy" in _names(cluster_processes(cluster.state_file)), "HAProxy carries the cluster's mark"

        config = _test_config(session_dir, port, root / "prometheus.yml")
        checked = subprocess.run([promtool(), "check", "config", str(config)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        prom_port = free_port()
        with open(root / "prometheus.log", "wb") as log:
            prom_process = subprocess.Popen(
                [
                    prometheus(),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={root / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        wait_until(lambda: _ready(prom), 60, what="Prometheus to answer")
        wait_until(
            lambda: _up_targets(prom).get("aipd"), 60, what=f"the service scraped; see {root / 'prometheus.log'}"
        )
        # Rates need counters that grow while Prometheus watches: a first wave creates every series, a second one,
        # a few scrapes later, makes them all increase.
        _send_traffic(service_url, wave=0)
        time.sleep(3.0)
        _send_traffic(service_url, wave=1)
        node_ports = [node.ports["metrics-export-port"] for node in cluster.nodes]
        yield {
            "prom": prom,
            "service_url": service_url,
            "session_dir": session_dir,
            "node_ports": node_ports,
            "log": root / "prometheus.log",
        }
    finally:
        if prom_process is not None:
            os.killpg(prom_process.pid, signal.SIGTERM)
            prom_process.wait(timeout=30)
        cluster_down(work_dir)
    # Serve's HAProxy runs in a session of its own and outlives its node's process group: down ends it too
    assert not cluster_processes(cluster.state_file), "a process of the cluster outlived `cluster down`"


def _names(processes: list) -> set[str]:
    """Their names, skipping any that ended meanwhile (a reloaded HAProxy's old process exits)."""
    names = set()
    for process in processes:
        with contextlib.suppress(psutil.Error):
            names.add(process.name())
    return names


def _ready(prom: Prometheus) -> bool:
    try:
        return prom.http.get("/-/ready").status_code == 200
    except httpx.HTTPError:
        return False


def _up_targets(prom: Prometheus) -> dict[str, set[str]]:
    up: dict[str, set[str]] = {}
    for target in prom.targets():
        if target["health"] == "up":
            up.setdefault(target["labels"]["job"], set()).add(target["labels"]["instance"])
    return up


def test_prometheus_scrapes_the_service_and_every_ray_node_from_rays_discovery_file(stack) -> None:
    prom: Prometheus = stack["prom"]
    discovery = Path(stack["session_dir"]) / "prom_metrics_service_discovery.json"

    def every_node_up() -> bool:
        up = _up_targets(prom)
        ray_ports = {int(instance.rsplit(":", 1)[1]) for instance in up.get("ray", set())}
        return bool(up.get("aipd")) and set(stack["node_ports"]) <= ray_ports

    wait_until(every_node_up, 90, interval_s=1.0, what=f"the service and both Ray nodes up; see {stack['log']}")
    listed = json.loads(discovery.read_text())[0]["targets"]
    assert {int(t.rsplit(":", 1)[1]) for t in listed} >= set(stack["node_ports"])


def test_every_dashboard_and_rule_expression_evaluates_and_returns_data(stack) -> None:
    """Dashboards and recording rules return finite samples. An alert's expression is empty while the service is
    healthy (its firing is shown by `promtool test rules`), so here it must evaluate, and every series or recording
    rule it compares must return data."""
    prom: Prometheus = stack["prom"]
    queries = dashboard_queries() + rule_queries()
    pending = {q.source: q for q in queries}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + 150
    while pending and time.monotonic() < deadline:
        for source, query in list(pending.items()):
            expr = grafana_to_promql(query.expr)
            try:
                if query.kind == "alert":
                    prom.query(expr)
                    names_with_data = {name for name in metric_names(expr) if prom.samples(name)}
                    ok = names_with_data == metric_names(expr)
                else:
                    values = prom.samples(expr)
                    ok = any(math.isfinite(v) for v in values)
            except AssertionError as err:  # an evaluation error is final, not a matter of waiting
                errors[source] = str(err)
                del pending[source]
                continue
            if ok:
                del pending[source]
        time.sleep(2.0)
    assert not errors, errors
    assert not pending, f"no data after waiting: {sorted(pending)}"


def test_dashboards_name_only_metrics_the_service_and_ray_really_export(stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def names(text: str) -> set[str]:
        return {s.name for family in text_string_to_metric_families(text) for s in family.samples}

    service = names(httpx.get(f"{stack['service_url']}/metrics", timeout=30).text)
    ray_names: set[str] = set()
    for port in stack["node_ports"]:
        ray_names |= names(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text)
    exported = service | ray_names
    for query in dashboard_queries():
        for name in metric_names(grafana_to_promql(query.expr)):
            if name.startswith("aipd:"):
                assert name in recording_rule_names(), f"{query.source}: {name} is no recording rule"
            else:
                assert name in exported, f"{query.source}: {name} is exported neither by /metrics nor by Ray"
    # The recording rules read only exported series too.
    for query in rule_queries():
        for name in metric_names(query.expr) - recording_rule_names() - {"up"}:
            assert name in exported, f"{query.source}: {name} is not exported"


def test_ray_writes_the_dashboards_that_grafana_provisions(stack) -> None:
    """The Ray provider of grafana/provisioning reads <session>/metrics/grafana/dashboards through session_latest."""
    folder = Path(stack["session_dir"]) / "metrics" / "grafana" / "dashboards"
    generated = sorted(folder.glob("*.json"))
    assert {"default_grafana_dashboard.json", "serve_grafana_dashboard.json"} <= {p.name for p in generated}
    for path in generated:
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] and dashboard["panels"], path
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    ray_path = next(p["options"]["path"] for p in provider["providers"] if p["name"] == "ray")
    assert ray_path.endswith("/session_latest/metrics/grafana/dashboards")
    assert Path(ray_path.replace("/tmp/ray/session_latest", stack["session_dir"])) == folder
