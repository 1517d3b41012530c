"""Reading the monitoring files the way Prometheus and Grafana do: every PromQL expression, and the metric names in it.

Shared by the fast file checks and the live test against a real Prometheus, so both look at the same expressions.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "cluster" / "monitoring"
RULES_DIR = MONITORING / "rules"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
PROVISIONING_DIR = MONITORING / "grafana" / "provisioning"

# Grafana's built-in variables, as a query over the last few minutes would see them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "15s", "$__range": "1h"}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
}


@dataclass(frozen=True)
class Query:
    source: str  # where it is written, for failure messages
    expr: str
    kind: str  # "dashboard" | "record" | "alert"
    name: str = ""  # recording rule or alert name


def rule_files() -> list[Path]:
    """What prometheus.yml loads (rules/*.rules.yml)."""
    return sorted(RULES_DIR.glob("*.rules.yml"))


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def rule_queries() -> list[Query]:
    queries = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                kind = "record" if "record" in rule else "alert"
                name = rule.get("record") or rule["alert"]
                queries.append(Query(f"{path.name}:{name}", rule["expr"].strip(), kind, name))
    return queries


def panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[Query]:
    queries = []
    for path in dashboard_files():
        for panel in panels(json.loads(path.read_text())):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    queries.append(
                        Query(f"{path.name}:{panel['title']}:{target['refId']}", target["expr"], "dashboard")
                    )
    return queries


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def metric_names(expr: str) -> set[str]:
    """The metric (or recording rule) names an expression selects, without functions, labels and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # string literals (label values, label_replace arguments)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        token, rest = match.group(0), text[match.end() :]
        if token.lower() in _KEYWORDS or rest.lstrip().startswith("("):
            continue
        if re.fullmatch(r"\d+[smhdwy]", token) or match.start() > 0 and text[match.start() - 1].isdigit():
            continue
        names.add(token)
    return names


def recording_rule_names() -> set[str]:
    return {q.name for q in rule_queries() if q.kind == "record"}


def promtool() -> str | None:
    return shutil.which("promtool")


def prometheus() -> str | None:
    return shutil.which("prometheus")
