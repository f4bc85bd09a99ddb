"""The Prometheus alert rules (deploy/prometheus) and the Grafana dashboard (deploy/grafana):
promtool checks and unit-tests the rules where it is installed (Debian's `prometheus` package,
which .ci/run installs), and every metric they use is one the daemon really serves."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from referral_watch.daemon import Metrics

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules.test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "referral-watch.json"
METRIC = re.compile(r"\breferral_watch_[a-z_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run(
        [tool, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=60, check=False
    )


def served() -> set[str]:
    """The sample names GET /metrics has, labelled series included."""
    metrics = Metrics()
    metrics.polls.labels("ok").inc()
    metrics.deliveries.labels("team", "ok").inc()
    metrics.webhook_events.labels("referral-created", "ok").inc()
    metrics.poll_duration.observe(1.0)
    text = metrics.render().decode()
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1] not in "#"}


def rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in data["panels"] for target in panel["targets"]]


def test_promtool_accepts_the_rules() -> None:
    checked = promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


def test_each_alert_fires_when_it_should_and_only_then() -> None:
    tested = promtool("test", "rules", RULES_TEST.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a case in the unit tests
    cases = RULES_TEST.read_text(encoding="utf-8")
    assert all(f"alertname: {rule['alert']}" in cases for rule in rules())


def test_the_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The passing run above means something: a rule that lost its condition fails it."""
    broken = RULES.read_text(encoding="utf-8").replace(
        "referral_watch_sign_in_needed) == 1", "referral_watch_sign_in_needed) >= 0"
    )
    assert broken != RULES.read_text(encoding="utf-8")
    (tmp_path / RULES.name).write_text(broken, encoding="utf-8")
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    tool = promtool("--version")  # skips without promtool
    assert tool.returncode == 0
    failed = subprocess.run(
        ["promtool", "test", "rules", RULES_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert failed.returncode != 0
    assert "ReferralWatchSignInExpired" in failed.stdout + failed.stderr


def test_the_rules_and_the_dashboard_use_only_metrics_the_daemon_serves() -> None:
    names = served()
    used_by_rules = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    used_by_dashboard = {name for expr in dashboard_exprs() for name in METRIC.findall(expr)}
    assert used_by_rules - names == set()
    assert used_by_dashboard - names == set()
    # and between them they show every metric there is (a histogram through its buckets)
    shown = used_by_rules | used_by_dashboard
    assert {n for n in names if not n.endswith(("_created", "_sum", "_count"))} <= shown


def test_every_alert_says_what_is_wrong_and_how_bad() -> None:
    for rule in rules():
        assert rule["alert"].startswith("ReferralWatch")
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_the_dashboard_is_one_importable_grafana_model() -> None:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert data["uid"] == "referral-watch"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["targets"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24  # Grafana's grid is 24 columns wide
    # every query follows the dashboard's job selector
    assert all('job=~"$job"' in expr for expr in dashboard_exprs())
