"""Prometheus rules: promtool checks and unit tests, the metrics they use, and the chart's copy of them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml"
RULES_TEST = REPO_ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
CHART_RULES = REPO_ROOT / "helm" / "mosaic" / "rules" / "mosaic-alerts.yaml"
REQUIRED_ALERTS = {
    "MosaicStreamFallingBehind",
    "MosaicFrameDropRateHigh",
    "MosaicTimeToFirstTokenHigh",
    "MosaicTierNearCapacity",
    "MosaicWorkerDown",
    "MosaicStreamStalled",
    "MosaicMetadataStoreDown",
    "MosaicDurableBacklog",
    "MosaicDurableWritersSaturated",
    "MosaicIngestWaitingForDisk",
    "MosaicMetadataBacklog",
}
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package `prometheus` provides it)"
)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=60)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", RULES_TEST)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests bite: without its `absent()` arm, MosaicWorkerDown no longer passes them."""
    broken = RULES.read_text().replace("or\n          0 * absent(mosaic_workers_up)", "")
    assert broken != RULES.read_text(), "the mutation no longer applies; update this test"
    (tmp_path / "alerts.yaml").write_text(broken)
    shutil.copy(RULES_TEST, tmp_path / "alerts_test.yaml")
    assert _promtool("check", "rules", tmp_path / "alerts.yaml").returncode == 0
    result = _promtool("test", "rules", tmp_path / "alerts_test.yaml")
    assert result.returncode != 0 and "MosaicWorkerDown" in result.stdout + result.stderr


def test_required_alerts_exist_and_every_alert_is_unit_tested() -> None:
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert alerts >= REQUIRED_ALERTS
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def test_alerts_use_only_exported_metrics(exported_metrics, metric_names_in) -> None:
    exported = set().union(*exported_metrics.values())
    for rule in _rules():
        names = metric_names_in(rule["expr"])
        assert names <= exported, f"{rule.get('alert') or rule.get('record')} uses unexported {names - exported}"


def test_every_alert_has_severity_and_text() -> None:
    for rule in _rules():
        if "alert" in rule:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
            assert "for" in rule, f"{rule['alert']} would fire on a single bad scrape"


def test_chart_copy_is_identical() -> None:
    assert RULES.read_bytes() == CHART_RULES.read_bytes(), "run: python scripts/check_chart.py --fix"


@needs_promtool
def test_scrape_config_example_passes_promtool(tmp_path: Path) -> None:
    """deploy/prometheus/scrape.yaml is a complete Prometheus configuration that loads alerts.yaml.

    Debian's promtool is built without Kubernetes service discovery and rejects `kubernetes_sd_configs`; with
    such a build the Kubernetes job is checked with its discovery swapped for a static target (its relabelling
    is still checked), and the discovery block itself only against the documented field names.
    """
    config = yaml.safe_load((RULES.parent / "scrape.yaml").read_text())
    assert config["rule_files"] == ["alerts.yaml"]
    probe = tmp_path / "probe.yaml"
    probe.write_text("scrape_configs:\n  - job_name: p\n    kubernetes_sd_configs:\n      - role: endpoints\n")
    probed = _promtool("check", "config", probe)
    if "kubernetes_sd_configs" in probed.stdout + probed.stderr:
        for job in config["scrape_configs"]:
            if "kubernetes_sd_configs" in job:
                assert job.pop("kubernetes_sd_configs") == [{"role": "endpoints"}]
                job["static_configs"] = [{"targets": ["router:9464"]}]
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / "alerts.yaml")
    result = _promtool("check", "config", tmp_path / "prometheus.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def _chart_rules(check_chart, release: str, num_pods: int) -> dict:
    values = {"ray": {"worker": {"replicas": num_pods}}, "monitoring": {"prometheusRule": {"enabled": True}}}
    manifests = check_chart.render_manifests(values, release=release)
    [rule] = [doc for doc in manifests if doc["kind"] == "PrometheusRule"]
    return {"groups": rule["spec"]["groups"]}


@needs_promtool
def test_two_releases_compare_with_their_own_worker_count(check_chart, tmp_path: Path) -> None:
    """Releases alpha (2 worker pods) and beta (1) scraped by one Prometheus: alpha losing a worker fires for alpha
    only, and beta at its full single worker fires nothing."""
    for release, num_pods in (("alpha", 2), ("beta", 1)):
        (tmp_path / f"{release}.yaml").write_text(yaml.safe_dump(_chart_rules(check_chart, release, num_pods)))
    [alert] = [rule for rule in _rules() if rule.get("alert") == "MosaicWorkerDown"]
    annotations = {
        "summary": "Mosaic has 1 live workers, fewer than expected (or reports none)",
        "description": alert["annotations"]["description"],
    }
    series = 'mosaic_workers_up{{job="{0}-mosaic-router",namespace="mosaic",service="{0}-mosaic-router",pod="{0}-0"}}'
    tests = {
        "rule_files": ["alpha.yaml", "beta.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series.format("alpha"), "values": "2x5 1x20"},
                    {"series": series.format("beta"), "values": "1x25"},
                ],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "MosaicWorkerDown", "exp_alerts": []},
                    {
                        "eval_time": "10m",
                        "alertname": "MosaicWorkerDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "critical",
                                    "job": "alpha-mosaic-router",
                                    "namespace": "mosaic",
                                    "service": "alpha-mosaic-router",
                                },
                                "exp_annotations": annotations,
                            }
                        ]
                        * 2,  # each release's PrometheusRule evaluates every alert; Alertmanager merges the two
                    },
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(tests))
    result = _promtool("test", "rules", tmp_path / "test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
