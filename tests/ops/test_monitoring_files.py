"""The monitoring files on their own: Prometheus's own checks, the alerts' unit tests, Grafana's JSON and provisioning,
and that every name they use is one the service exports (from serving/metrics.py) or a recording rule defines."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from tests.ops.promql import (
    DASHBOARDS_DIR,
    MONITORING,
    PROVISIONING_DIR,
    ROOT,
    RULES_DIR,
    dashboard_files,
    dashboard_queries,
    grafana_to_promql,
    metric_names,
    panels,
    promtool,
    recording_rule_names,
    rule_files,
    rule_queries,
)

GRAFANA_PANEL_TYPES = {"row", "timeseries", "heatmap", "stat", "gauge", "bargauge", "table", "text"}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    binary = promtool()
    if binary is None:
        pytest.skip("promtool not installed: apt-get install -y prometheus (make test installs it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, cwd=MONITORING)


def exported_series() -> set[str]:
    """Series names /metrics has for serving/metrics.py's METRICS (counters keep their _total, histograms expand)."""
    from serving.metrics import METRICS

    names = set()
    for name, spec in METRICS.items():
        names |= {name} if spec.kind == "counter" else {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_prometheus_config_and_rules_pass_promtool() -> None:
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert f"{len(rule_files())} rule files found" in config.stdout
    rules = _promtool("check", "rules", *[str(p) for p in rule_files()])
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_fires_on_its_failure_and_stays_quiet_when_healthy() -> None:
    tested = yaml.safe_load((RULES_DIR / "aipd-alerts.test.yml").read_text())
    alerts = {q.name for q in rule_queries() if q.kind == "alert"}
    firing = {case["alertname"] for case in tested["tests"][0]["alert_rule_test"] if case["exp_alerts"]}
    quiet = {case["alertname"] for case in tested["tests"][1]["alert_rule_test"] if not case["exp_alerts"]}
    assert firing == alerts and quiet == alerts, "every alert needs a firing and a quiet case"
    result = _promtool("test", "rules", "rules/aipd-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_loads_every_rule_file_but_not_the_unit_tests() -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.rules.yml"]
    assert {p.name for p in rule_files()} == {"aipd.rules.yml", "aipd-alerts.rules.yml", "aipd-baseline.rules.yml"}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"ray", "aipd"}
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert jobs["ray"]["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    assert jobs["aipd"]["metrics_path"] == "/metrics"


def test_dashboards_are_valid_grafana_json() -> None:
    datasources = yaml.safe_load((PROVISIONING_DIR / "datasources" / "prometheus.yml").read_text())["datasources"]
    (datasource,) = datasources
    assert datasource["type"] == "prometheus" and datasource["isDefault"] is True
    assert dashboard_files(), f"no dashboard in {DASHBOARDS_DIR}"
    uids = set()
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        assert dashboard["uid"] not in uids and len(dashboard["uid"]) <= 40
        uids.add(dashboard["uid"])
        assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
        every = panels(dashboard)
        assert len({p["id"] for p in every}) == len(every), "panel ids must be unique"
        cells: set[tuple[int, int]] = set()
        for panel in every:
            assert panel["type"] in GRAFANA_PANEL_TYPES, panel["type"]
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, (panel["title"], grid)
            covered = {
                (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not covered & cells, f"panel {panel['title']!r} overlaps another"
            cells |= covered
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert ref_ids and len(set(ref_ids)) == len(ref_ids)
            for target in panel["targets"]:
                assert target["expr"].strip() and target["datasource"] == panel["datasource"]


def test_detector_dashboard_shows_what_the_issue_asks_for() -> None:
    dashboard = json.loads((DASHBOARDS_DIR / "aipd-detector.json").read_text())
    exprs = " ".join(t["expr"] for p in panels(dashboard) for t in p.get("targets", []))
    for needed in (
        "rate(prediction_latency_seconds_count",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "prediction_errors_total",
        "prediction_batch_size_bucket",
        "ray_serve_deployment_replica_healthy",
        "prediction_probability_bucket",
        "aipd:baseline:prediction_probability_mean",
    ):
        assert needed in exprs, f"the detector dashboard has no panel using {needed}"


def test_dashboards_and_rules_name_only_exported_metrics_or_recording_rules() -> None:
    """The service's names come from serving/metrics.py; ray_serve_* are checked against a real scrape (slow test)."""
    known = exported_series() | recording_rule_names() | {"up"}
    for query in dashboard_queries() + rule_queries():
        for name in metric_names(grafana_to_promql(query.expr)):
            assert name in known or name.startswith("ray_serve_"), f"{query.source} uses unknown metric {name}"


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    providers = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "dashboards.yml").read_text())["providers"]
    paths = {p["name"]: p["options"]["path"] for p in providers}
    assert paths["ray"] == "/tmp/ray/session_latest/metrics/grafana/dashboards"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_mounts = compose["services"]["grafana"]["volumes"]
    assert f"./cluster/monitoring/grafana/dashboards:{paths['aipd']}:ro" in grafana_mounts
    assert "./cluster/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts
    # Ray's temp dir of the head is what both Grafana (its dashboards) and Prometheus (the discovery file) read.
    assert "ray-head-tmp:/tmp/ray" in compose["services"]["ray-head"]["volumes"]
    for service in ("grafana", "prometheus"):
        assert "ray-head-tmp:/tmp/ray:ro" in compose["services"][service]["volumes"]


def test_baseline_is_written_from_an_evaluation_report(tmp_path) -> None:
    from cluster.monitoring.baseline import main

    report = {"threshold": 0.7, "ece": 0.03, "n": 200, "confusion_matrix": {"tn": 95, "fp": 5, "fn": 20, "tp": 80}}
    (tmp_path / "evaluation.json").write_text(json.dumps(report))
    out = tmp_path / "baseline.rules.yml"
    main([str(tmp_path / "evaluation.json"), "--out", str(out)])
    rules = {r["record"]: r["expr"] for r in yaml.safe_load(out.read_text())["groups"][0]["rules"]}
    assert rules == {
        "aipd:baseline:prediction_probability_mean": "vector(0.5)",  # (tp + fn) / n
        "aipd:baseline:ai_generated_ratio": "vector(0.425)",
    }  # (tp + fp) / n
    assert "ECE 0.0300" in out.read_text()
    committed = {
        r["record"] for r in yaml.safe_load((RULES_DIR / "aipd-baseline.rules.yml").read_text())["groups"][0]["rules"]
    }
    assert committed == set(rules), "the generated file must define what the committed one does"
    if promtool():
        assert _promtool("check", "rules", str(out)).returncode == 0


def test_baseline_refuses_a_file_that_is_no_evaluation_report(tmp_path) -> None:
    from cluster.monitoring.baseline import main

    (tmp_path / "other.json").write_text(json.dumps({"auroc": 0.9}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "other.json"), "--out", str(tmp_path / "x.yml")])
    assert exit_info.value.code == 1
    assert not (tmp_path / "x.yml").exists()


def test_the_drift_alerts_use_the_thresholds_drift_reports_use() -> None:
    """/drift (app/drift.py) and Prometheus's drift alerts judge the same shift over the same number of answers, and
    the shifts they alert on are taken from the baseline under the names the baseline writer gives its rules."""
    from app import drift

    rules = yaml.safe_load(drift.ALERT_RULES.read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    probability, share = alerts["AipdPredictionDrift"], alerts["AipdVerdictShareDrift"]
    assert f"> {drift.PROBABILITY_SHIFT_ALERT}" in probability and f"> {drift.AI_SHARE_SHIFT_ALERT}" in share
    assert all(f">= {drift.DRIFT_MIN_PREDICTIONS}" in expr for expr in (probability, share))
    assert {drift.MEAN_RULE, drift.AI_SHARE_RULE} <= recording_rule_names()
    shifts = {q.name: q.expr for q in rule_queries() if q.kind == "record" and q.name.endswith("_shift_1h")}
    assert drift.MEAN_RULE in shifts["aipd:prediction_probability:mean_shift_1h"]
    assert drift.AI_SHARE_RULE in shifts["aipd:prediction_ai_generated:ratio_shift_1h"]


def test_the_drift_alert_names_that_start_a_retraining_are_the_rules_own() -> None:
    from app.drift import ALERT_RULES, DRIFT_ALERTS

    rules = yaml.safe_load(ALERT_RULES.read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    assert set(DRIFT_ALERTS) <= names
