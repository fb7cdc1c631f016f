"""The Grafana dashboard charts every metric the service exports, and only those, with sound PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "mosaic-dashboard.json"
CHART_DASHBOARD = REPO_ROOT / "helm" / "mosaic" / "dashboards" / "mosaic-dashboard.json"


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including panels nested in collapsed rows; rows themselves are left out."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_chart_copy_is_identical() -> None:
    assert DASHBOARD.read_bytes() == CHART_DASHBOARD.read_bytes(), "run: python scripts/check_chart.py --fix"


def test_every_exported_family_is_charted(dashboard, exported_metrics, metric_names_in) -> None:
    used = set().union(*(metric_names_in(t["expr"]) for p in _panels(dashboard) for t in p["targets"]))
    missing = sorted(family for family, names in exported_metrics.items() if not names & used)
    assert not missing, f"exported metric families with no panel: {missing}"


def test_every_query_references_only_exported_series(dashboard, exported_metrics, metric_names_in) -> None:
    exported = set().union(*exported_metrics.values())
    for panel in _panels(dashboard):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            names = metric_names_in(target["expr"])
            assert names, f"panel {panel['title']!r} query {target['refId']} references no mosaic metric"
            unknown = names - exported
            assert not unknown, f"panel {panel['title']!r} queries series the service does not export: {unknown}"


def test_template_variables_query_exported_series(dashboard, exported_metrics, metric_names_in) -> None:
    exported = set().union(*exported_metrics.values())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            names = metric_names_in(variable["query"]["query"])
            assert names and names <= exported, f"variable {variable['name']} queries {names}"


def test_counters_are_rated_and_histograms_are_quantiled(dashboard, exported_metrics) -> None:
    """A raw counter or a raw bucket series on a graph is meaningless: they must go through rate()."""
    counters = {f"{f}_total" for f, names in exported_metrics.items() if f"{f}_total" in names}
    histograms = {f for f, names in exported_metrics.items() if f"{f}_bucket" in names}
    for panel in _panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for counter in counters & set(re.findall(r"mosaic_\w+", expr)):
                assert re.search(rf"(rate|increase)\(\s*{counter}\b", expr), f"{panel['title']}: {counter} not rated"
            for family in histograms:
                if f"{family}_bucket" in expr:
                    assert "histogram_quantile(" in expr and re.search(r"by \([^)]*\ble\b", expr), (
                        f"{panel['title']}: buckets of {family} need histogram_quantile over sum by (..., le)"
                    )
                    assert re.search(rf"rate\(\s*{family}_bucket\b", expr), f"{panel['title']}: buckets not rated"


def test_panels_cover_the_operator_views(dashboard) -> None:
    """The views the issue asks for exist by name, so a refactor cannot silently drop one."""
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    assert "rate(mosaic_frames_ingested_total" in exprs and "rate(mosaic_frames_dropped_total" in exprs
    for family in ("mosaic_time_to_first_token_seconds", "mosaic_inter_token_latency_seconds"):
        for q in ("0.5", "0.99"):
            assert f"histogram_quantile({q}, sum by (mode, le) (rate({family}_bucket" in exprs
    assert "rate(mosaic_transfer_bytes_total" in exprs
    assert "sum by (code) (rate(mosaic_errors_total" in exprs
    assert "mosaic_tier_used_bytes" in exprs and "mosaic_tier_capacity_bytes" in exprs


def test_dashboard_structure(dashboard) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] and dashboard["title"]
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names[0] == "datasource", "the data source must be a variable so the dashboard imports anywhere"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, f"{panel['title']} overflows the 24-column grid"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']} has no unit"


def _expr_of(dashboard: dict[str, Any], title: str) -> str:
    [panel] = [p for p in _panels(dashboard) if p["title"] == title]
    [target] = panel["targets"]
    return target["expr"].replace("$job", ".*").replace("$worker", ".*")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian package `prometheus`)")
def test_worker_restarts_count_a_new_process_not_a_workers_first_report(dashboard, tmp_path: Path) -> None:
    """The router primes mosaic_worker_pid at 0 until each worker first reports (minutes of loading a model, scraped
    all along): that step is no restart, so a fresh deployment read as every worker restarted once. The series is
    the real metrics' own values (primed, first report, a process that replaced it), as promtool evaluates the
    panel's query."""
    from services.metrics import MosaicMetrics
    from services.telemetry import DurabilityHealth

    metrics = MosaicMetrics()
    metrics.prime(("0",))
    values = [metrics.registry.get_sample_value("mosaic_worker_pid", {"worker": "0"})] * 3
    for pid in (1234, 5678):  # its first report, then Ray's restart of it
        metrics.durability.set_health("0", DurabilityHealth(pid=pid))
        values += [metrics.registry.get_sample_value("mosaic_worker_pid", {"worker": "0"})] * 3
    panel_rule = {"record": "restarts", "expr": _expr_of(dashboard, "Worker restarts")}
    rules = {"groups": [{"name": "panel", "rules": [panel_rule]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    series = {"series": 'mosaic_worker_pid{job="mosaic",instance="r0:9464",worker="0"}',
              "values": " ".join(f"{v:g}" for v in values)}  # fmt: skip
    cases = [("5m", 0), ("8m", 1)]  # after the first report; after the restart
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [series],
            "promql_expr_test": [
                {"expr": "restarts", "eval_time": at, "exp_samples": [{"labels": 'restarts{worker="0"}', "value": n}]}
                for at, n in cases
            ],
        }],
    }  # fmt: skip
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(["promtool", "test", "rules", str(tmp_path / "test.yaml")], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_questions_panel_names_every_outcome(dashboard) -> None:
    """Its legend shows each outcome as its own series; the description says what each is, so an operator does not
    read a new one (``cancelled``: hang-ups) as errors."""
    from services.metrics import QUERY_OUTCOMES

    (panel,) = [p for p in _panels(dashboard) if p["title"] == "Questions by outcome"]
    missing = [o for o in QUERY_OUTCOMES if not re.search(rf"\b{o}\b", panel["description"])]
    assert not missing, f"outcomes the panel's description does not name: {missing}"
