"""The router's Services: gRPC is what router.service.type may publish; metrics stay inside the cluster, and their
scrapes keep the labels the alerts, the dashboard and users' queries match on.

The Prometheus Operator is not run here. `_operator_targets` applies what it does with a ServiceMonitor (its
documented target discovery and labelling) to the rendered Services, and `_scrape_yaml_targets` does the same for
the keep rule of deploy/prometheus/scrape.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
MONITORING = {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}


def _of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def _service(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [service] = [s for s in _of_kind(manifests, "Service") if s["metadata"]["name"] == name]
    return service


def _router_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    [deployment] = _of_kind(manifests, "Deployment")
    return deployment["spec"]["template"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"the model below reads matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str]:
    """Prometheus' `replace` relabelling, the only action the chart uses (fullmatch regex, $1-style groups)."""
    labels = dict(labels)
    for rule in rules:
        assert rule.get("action", "replace") == "replace", rule
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("sourceLabels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match:
            labels[rule["targetLabel"]] = match.expand(re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1")))
    return labels


def _operator_targets(manifests: list[dict[str, Any]], namespace: str) -> list[tuple[str, dict[str, str]]]:
    """(Service name, target labels) for each Service port a ServiceMonitor scrapes.

    The operator selects Services by label in the monitor's namespaces, keeps each endpoint's port by name, labels
    the target namespace, service (the Service's name) and job (the Service's `jobLabel` label, else its name),
    then applies the endpoint's relabelings.
    """
    targets = []
    for monitor in _of_kind(manifests, "ServiceMonitor"):
        spec = monitor["spec"]
        assert namespace in spec["namespaceSelector"]["matchNames"]
        for service in _of_kind(manifests, "Service"):
            labels = service["metadata"]["labels"]
            if not _selects(spec["selector"], labels):
                continue
            name = service["metadata"]["name"]
            for endpoint in spec["endpoints"]:
                for port in service["spec"]["ports"]:
                    if port["name"] != endpoint["port"]:
                        continue
                    job = labels.get(spec.get("jobLabel", ""), name)
                    target = {"namespace": namespace, "service": name, "job": job, "endpoint": port["name"]}
                    targets.append((name, _relabel(target, endpoint.get("relabelings", []))))
    return targets


def _scrape_yaml_targets(manifests: list[dict[str, Any]]) -> list[str]:
    """Service names whose ports the Kubernetes job of deploy/prometheus/scrape.yaml keeps."""
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "scrape.yaml").read_text())
    [job] = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    [keep] = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep["source_labels"] == [
        "__meta_kubernetes_service_label_app_kubernetes_io_name",
        "__meta_kubernetes_service_label_app_kubernetes_io_component",
        "__meta_kubernetes_endpoint_port_name",
    ], "the model below reads these three; update it with scrape.yaml"
    kept = []
    for service in _of_kind(manifests, "Service"):
        labels = service["metadata"]["labels"]
        for port in service["spec"]["ports"]:
            value = ";".join(
                [labels.get("app.kubernetes.io/name", ""), labels.get("app.kubernetes.io/component", ""), port["name"]]
            )
            if re.fullmatch(keep["regex"], value):
                kept.append(service["metadata"]["name"])
    return kept


@pytest.mark.parametrize("service_type", SERVICE_TYPES)
def test_the_router_service_publishes_grpc_only(check_chart, service_type: str) -> None:
    """A NodePort or LoadBalancer opens every port of its Service to the outside: /metrics must not be one."""
    manifests = check_chart.render_manifests({"router": {"service": {"type": service_type}}})
    service = _service(manifests, "mosaic-router")
    assert service["spec"]["type"] == service_type
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("grpc", 50051, "grpc")]


@pytest.mark.parametrize("service_type", SERVICE_TYPES)
def test_metrics_have_a_cluster_ip_service_of_their_own(check_chart, service_type: str) -> None:
    values = {"router": {"metricsPort": 9100, "service": {"type": service_type, "metricsPort": 9200}}}
    manifests = check_chart.render_manifests(values)
    service = _service(manifests, "mosaic-router-metrics")
    assert service["spec"]["type"] == "ClusterIP"
    assert "nodePort" not in service["spec"]["ports"][0]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [("metrics", 9200, "metrics")]
    pod = _router_pod(manifests)
    assert _selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    [router] = pod["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9100} in router["ports"]
    assert check_chart.validate(manifests) == []


@pytest.mark.parametrize("service_type", SERVICE_TYPES)
@pytest.mark.parametrize("release", ["mosaic", "alpha"])
def test_scraped_series_keep_the_router_services_job_and_service_labels(
    check_chart, service_type: str, release: str
) -> None:
    """One target per router pod, labelled job and service <release>-router as when the router Service carried the
    metrics port, and mosaic:workers_expected (which MosaicWorkerDown joins on namespace and job) labelled alike."""
    values = {"router": {"service": {"type": service_type}}, "monitoring": MONITORING}
    manifests = check_chart.render_manifests(values, release=release)
    router = f"{release}-mosaic-router" if release != "mosaic" else "mosaic-router"
    targets = _operator_targets(manifests, check_chart.NAMESPACE)
    assert targets == [
        (
            f"{router}-metrics",
            {"namespace": check_chart.NAMESPACE, "service": router, "job": router, "endpoint": "metrics"},
        )
    ]
    [rule] = _of_kind(manifests, "PrometheusRule")
    [record] = [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record") == "mosaic:workers_expected"]
    assert record["labels"] == {"namespace": targets[0][1]["namespace"], "job": targets[0][1]["job"]}


@pytest.mark.parametrize("service_type", SERVICE_TYPES)
def test_the_scrape_yaml_example_scrapes_each_router_pod_once(check_chart, service_type: str) -> None:
    """deploy/prometheus/scrape.yaml keeps every Service port named `metrics` of the router's labels: exactly one."""
    manifests = check_chart.render_manifests({"router": {"service": {"type": service_type}}})
    assert _scrape_yaml_targets(manifests) == ["mosaic-router-metrics"]


def test_the_models_of_the_scrapers_see_a_metrics_port_wherever_it_is(check_chart) -> None:
    """The two models above are not blind: a `metrics` port put back on the gRPC Service is a second target in each,
    labelled as the Service it came from."""
    manifests = check_chart.render_manifests({"monitoring": MONITORING})
    _service(manifests, "mosaic-router")["spec"]["ports"].append({"name": "metrics", "port": 9464})
    assert sorted(_scrape_yaml_targets(manifests)) == ["mosaic-router", "mosaic-router-metrics"]
    [monitor] = _of_kind(manifests, "ServiceMonitor")
    monitor["spec"]["endpoints"][0].pop("relabelings")
    jobs = sorted(labels["job"] for _, labels in _operator_targets(manifests, check_chart.NAMESPACE))
    assert jobs == ["mosaic-router", "mosaic-router-metrics"]


def test_notes_point_at_the_metrics_service(check_chart) -> None:
    notes = check_chart.render({"router": {"service": {"type": "LoadBalancer"}}})["mosaic/templates/NOTES.txt"]
    assert "http://mosaic-router-metrics.mosaic.svc:9464/metrics" in notes
