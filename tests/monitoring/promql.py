"""The PromQL of ``deploy/monitoring``: every expression of the Grafana dashboard and of the
alert rules, the dashboard's variables replaced by fixed values, and the metric selectors each
names; and ``promtool``, installed from Debian's ``prometheus`` package when missing and we are
root (skipped otherwise, like the other tests that need a program)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = MONITORING / "prometheus" / "cbtstream-rules.yaml"
RULE_TESTS = MONITORING / "prometheus" / "cbtstream-rules.test.yaml"
PROMETHEUS_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "cbtstream.json"
PROVISIONING = MONITORING / "grafana" / "provisioning"

#: The dashboard's variables as a Grafana would expand them (``$rpo`` at its default, 4 h).
VARIABLES = {"$__rate_interval": "1m", "$__range": "15m", "$rpo": "14400"}

#: A metric name with its label matchers, if any: our metrics and ``up`` (of the scrape jobs).
_SELECTOR = re.compile(r"(?<![\w\"-])(cbtstream_[a-z0-9_]+|up)(?![\w(])\s*(\{[^}]*\})?")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*\"")


@dataclass(frozen=True)
class Expr:
    """One expression and where it comes from (``panel '<title>' <refId>`` or ``alert <name>``)."""

    where: str
    promql: str


@dataclass(frozen=True)
class Selector:
    """A vector selector of an expression: ``name{matchers}``."""

    name: str
    matchers: str  # "" or "{...}"

    @property
    def text(self) -> str:
        return self.name + self.matchers

    @property
    def label_names(self) -> set[str]:
        return {m.group(1) for m in _MATCHER.finditer(self.matchers)}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def expand(promql: str, variables: dict[str, str] = VARIABLES) -> str:
    for name in sorted(variables, key=len, reverse=True):  # $__range before $rpo...
        promql = promql.replace(name, variables[name])
    if "$" in promql:
        raise ValueError(f"a dashboard variable is left in {promql!r}")
    return promql


def dashboard_expressions() -> list[Expr]:
    return [Expr(f"panel {p['title']!r} {t['refId']}", expand(t["expr"]))
            for p in dashboard()["panels"] for t in p.get("targets", ())]


def rule_expressions() -> list[Expr]:
    return [Expr(f"alert {r['alert']}" if "alert" in r else f"record {r['record']}",
                 " ".join(r["expr"].split())) for r in rules()]


_KEYWORDS = {"and", "or", "unless", "offset", "bool", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(promql: str) -> set[str]:
    """Every name the expression reads series of, found without :data:`_SELECTOR`'s prefix
    rule: what is left once strings, label matchers and lists, ranges, durations, numbers and
    function calls are taken out (so a misspelt metric cannot hide from :func:`selectors`)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', " ", promql)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b\d+(\.\d+)?([smhdwy]|ms)?\b", " ", s)
    names = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\(|[a-zA-Z0-9_:])", s)
    return {n for n in names if n.lower() not in _KEYWORDS}


def selectors(promql: str) -> list[Selector]:
    seen: dict[str, Selector] = {}
    for m in _SELECTOR.finditer(promql):
        s = Selector(m.group(1), " ".join((m.group(2) or "").split()))
        seen.setdefault(s.text, s)
    return list(seen.values())


def promtool() -> str:
    """The ``promtool`` program; installed (Debian's ``prometheus``) when missing and we are
    root, else the test is skipped."""
    return _program("promtool")


def prometheus() -> str:
    return _program("prometheus")


def _program(name: str) -> str:
    from cbtctl.stack import system

    tool = {"promtool": system.PROMTOOL, "prometheus": system.PROMETHEUS}[name]
    if not tool.present() and system.is_root():
        system.ensure_tools([tool])
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {tool.package}: "
                    f"sudo apt-get install -y {tool.package}, or make stack as root)")
    return path
