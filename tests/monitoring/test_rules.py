"""``deploy/monitoring`` without a stack: the alert rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``), the example Prometheus configuration is valid, every alert
has its annotations, severity and runbook anchor and a unit test that makes it fire, and the
Grafana dashboard is well formed with every expression valid PromQL (each one checked by
``promtool`` as a recording rule). That each names metrics that exist is the end-to-end test's
business (``test_alerts_e2e.py``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.monitoring.promql import (
    PROMETHEUS_CONFIG,
    PROVISIONING,
    RULE_TESTS,
    RULES,
    dashboard,
    dashboard_expressions,
    metric_names,
    promtool,
    rule_expressions,
    rules,
    selectors,
)

SEVERITIES = {"critical", "warning"}


def _run(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(argv)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def test_promtool_checks_the_rules() -> None:
    assert "SUCCESS" in _run(promtool(), "check", "rules", str(RULES))


def test_promtool_unit_tests_of_the_rules() -> None:
    assert "SUCCESS" in _run(promtool(), "test", "rules", str(RULE_TESTS))


def test_the_example_prometheus_configuration() -> None:
    _run(promtool(), "check", "config", str(PROMETHEUS_CONFIG))


def test_every_alert_is_annotated_and_unit_tested() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 10
    names = [r["alert"] for r in alerts]
    assert len(set(names)) == len(names)
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {case["alertname"] for t in tests for case in t.get("alert_rule_test", ())
             if case.get("exp_alerts")}
    for r in alerts:
        name = r["alert"]
        assert name.startswith("Cbtstream"), name
        assert r["labels"]["severity"] in SEVERITIES, name
        ann = r["annotations"]
        assert ann["summary"] and ann["description"], name
        assert ann["runbook_url"] == f"docs/operations.md#{name.lower()}", name
        assert name in fired, f"{name}: no unit test makes it fire"


def test_the_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] == "cbtstream"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["rpo"]["current"]["value"] == "14400"
    ids = [p["id"] for p in d["panels"]]
    assert len(set(ids)) == len(ids)
    titles = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["title"] not in titles, p["title"]
        titles.add(p["title"])
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
    assert len(dashboard_expressions()) >= 20


def test_every_metric_named_is_ours() -> None:
    """Every name an expression reads is a ``cbtstream_`` metric or the scrape's ``up``, so the
    end-to-end test, which checks the selectors, sees every metric named (a misspelt one too)."""
    for e in dashboard_expressions() + rule_expressions():
        assert metric_names(e.promql) == {s.name for s in selectors(e.promql)}, e
    assert metric_names('rate(cbstream_syncs_total{outcome="failed"}[5m]) > 0') == {
        "cbstream_syncs_total"}


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    group = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e.promql}
        for i, e in enumerate(dashboard_expressions())]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(group, sort_keys=False))
    out = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_grafana_provisioning_files() -> None:
    dashboards = yaml.safe_load((PROVISIONING / "dashboards" / "cbtstream.yaml").read_text())
    provider = dashboards["providers"][0]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["options"]["path"]
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
