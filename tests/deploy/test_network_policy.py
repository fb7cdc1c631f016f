"""The chart's NetworkPolicies: which of the pods the chart creates each one selects and admits, and on which ports.

Selectors are matched against the pod template labels of the rendered workloads (KubeRay copies the RayCluster's
head and worker template labels onto the pods it creates), so a label change on either side fails here.
"""

from __future__ import annotations

from typing import Any

import helm_python
import pytest

# Namespaced peers (no namespaceSelector, no ipBlock) select pods of the policy's own namespace.
SAME_NAMESPACE_KEYS = {"podSelector"}


def _pod_labels(manifests: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Pod kind -> the labels its pods carry: router, redis, ray-head, ray-worker."""
    pods = {}
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            labels = doc["spec"]["template"]["metadata"]["labels"]
            pods[labels["app.kubernetes.io/component"]] = labels
        elif doc["kind"] == "RayCluster":
            spec = doc["spec"]
            pods["ray-head"] = spec["headGroupSpec"]["template"]["metadata"]["labels"]
            for group in spec["workerGroupSpecs"]:
                pods["ray-worker"] = group["template"]["metadata"]["labels"]
    assert {"router", "ray-head", "ray-worker"} <= set(pods), sorted(pods)
    return pods


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels and matchExpressions, ANDed)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _selected(selector: dict[str, Any], pods: dict[str, dict[str, str]]) -> set[str]:
    return {name for name, labels in pods.items() if _matches(selector, labels)}


def _policies(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == "NetworkPolicy"}


def _admitted(rule: dict[str, Any], pods: dict[str, dict[str, str]]) -> set[str]:
    """Pods of the release's namespace that a rule's `from` admits (each peer a podSelector only)."""
    admitted = set()
    for peer in rule["from"]:
        assert set(peer) == SAME_NAMESPACE_KEYS, f"peer reaches beyond the release's namespace: {peer}"
        admitted |= _selected(peer["podSelector"], pods)
    return admitted


def test_policies_follow_their_flag(check_chart, rendered) -> None:
    assert set(_policies(rendered["default"])) == {"mosaic-router", "mosaic-ray", "mosaic-redis"}
    assert _policies(check_chart.render_manifests({"networkPolicy": {"enabled": False}})) == {}


def test_no_redis_policy_with_external_redis(rendered) -> None:
    assert set(_policies(rendered["external-redis"])) == {"mosaic-router", "mosaic-ray"}


@pytest.mark.parametrize("name", ["default", "all-enabled", "external-redis"])
def test_policies_restrict_ingress_only(rendered, name: str) -> None:
    for policy in _policies(rendered[name]).values():
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        assert "egress" not in policy["spec"]


@pytest.mark.parametrize("name", ["default", "all-enabled"])
def test_ray_pods_admit_each_other_and_the_router_on_every_port(rendered, name: str) -> None:
    pods = _pod_labels(rendered[name])
    policy = _policies(rendered[name])["mosaic-ray"]["spec"]
    assert _selected(policy["podSelector"], pods) == {"ray-head", "ray-worker"}
    [rule] = policy["ingress"]
    assert "ports" not in rule, "Ray uses many ports between its own pods"
    assert _admitted(rule, pods) == {"ray-head", "ray-worker", "router"}


def test_redis_admits_the_router_and_the_ray_pods_on_its_port(rendered) -> None:
    manifests = rendered["default"]
    pods = _pod_labels(manifests)
    policy = _policies(manifests)["mosaic-redis"]["spec"]
    assert _selected(policy["podSelector"], pods) == {"redis"}
    [rule] = policy["ingress"]
    assert _admitted(rule, pods) == {"router", "ray-head", "ray-worker"}
    redis = next(d for d in manifests if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert rule["ports"] == [{"port": redis["ports"][0]["containerPort"], "protocol": "TCP"}]


def test_policies_leave_another_release_alone(check_chart, rendered) -> None:
    """Two releases in one namespace: neither's policies select or admit the other's pods."""
    other = _pod_labels(check_chart.render_manifests({}, release="other"))
    for policy in _policies(rendered["default"]).values():
        assert _selected(policy["spec"]["podSelector"], other) == set(), policy["metadata"]["name"]
        for rule in policy["spec"]["ingress"]:
            if policy["metadata"]["name"] != "mosaic-router":
                assert _admitted(rule, other) == set(), policy["metadata"]["name"]


def _router_rules(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Port name -> the router policy's rule for that container port."""
    pods = _pod_labels(manifests)
    policy = _policies(manifests)["mosaic-router"]["spec"]
    assert _selected(policy["podSelector"], pods) == {"router"}
    router = next(d for d in manifests if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["containerPort"]: p["name"] for p in router["ports"]}
    rules = {}
    for rule in policy["ingress"]:
        [port] = rule["ports"]
        assert port["protocol"] == "TCP"
        rules[port_names[port["port"]]] = rule
    return rules


def test_router_grpc_admits_anyone_and_metrics_the_cluster_by_default(rendered) -> None:
    rules = _router_rules(rendered["default"])
    assert set(rules) == {"grpc", "metrics"}
    assert "from" not in rules["grpc"], "no `from`: any source, inside or outside the cluster"
    assert rules["metrics"]["from"] == [{"namespaceSelector": {}}]


def test_router_peers_can_be_narrowed(check_chart, rendered) -> None:
    rules = _router_rules(rendered["all-enabled"])
    network_policy = check_chart.VALUE_SETS["all-enabled"]["networkPolicy"]
    assert rules["grpc"]["from"] == network_policy["clients"]
    assert rules["metrics"]["from"] == network_policy["metricsFrom"]


def test_router_ports_follow_the_container_ports(check_chart) -> None:
    manifests = check_chart.render_manifests({"router": {"grpcPort": 6000, "metricsPort": 7000}})
    assert set(_router_rules(manifests)) == {"grpc", "metrics"}
    assert check_chart.validate(manifests) == []


def test_the_operator_console_admits_the_grpc_clients(check_chart) -> None:
    """engine.serveOptions.console starts a web page on console_port (8080 by default) beside gRPC."""
    clients = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    for options, port in (({"console": True}, 8080), ({"console": True, "console_port": 8443}, 8443)):
        values = {"engine": {"serveOptions": options}, "networkPolicy": {"clients": clients}}
        ingress = _policies(check_chart.render_manifests(values))["mosaic-router"]["spec"]["ingress"]
        assert {"ports": [{"port": port, "protocol": "TCP"}], "from": clients} in ingress
    ingress = _policies(check_chart.render_manifests({}))["mosaic-router"]["spec"]["ingress"]
    assert [rule["ports"][0]["port"] for rule in ingress] == [50051, 9464]


def test_empty_metrics_from_closes_the_metrics_port(check_chart) -> None:
    manifests = check_chart.render_manifests({"networkPolicy": {"metricsFrom": []}})
    assert set(_router_rules(manifests)) == {"grpc"}
    values = {"networkPolicy": {"metricsFrom": []}, "monitoring": {"serviceMonitor": {"enabled": True}}}
    with pytest.raises(helm_python.HelmError, match=r"networkPolicy\.metricsFrom"):
        check_chart.render_manifests(values)


def test_a_misspelt_peer_is_refused_by_the_schema(check_chart) -> None:
    with pytest.raises(helm_python.HelmError, match="podSelecter"):
        check_chart.render_manifests({"networkPolicy": {"clients": [{"podSelecter": {}}]}})


@pytest.mark.parametrize("kube_version", ["oldest", "newest"])
def test_policies_validate(check_chart, rendered, kube_version: str) -> None:
    version = check_chart.KUBE_VERSIONS[0 if kube_version == "oldest" else -1]
    for name in ("default", "all-enabled"):
        policies = list(_policies(rendered[name]).values())
        assert policies and check_chart.validate(policies, version) == []
