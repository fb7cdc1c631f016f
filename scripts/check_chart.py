"""Offline checks of the Helm chart and the monitoring files, for CI and for tests/deploy.

No helm binary and no cluster are needed: helm-python-sdk (Helm's own Go SDK behind a C ABI) renders and
lints, kubernetes-validate checks built-in kinds against the Kubernetes OpenAPI schemas, and the custom
resources are checked against the structure of their CRDs written out below (no installed package ships
the KubeRay or Prometheus Operator schemas). promtool checks the rendered PrometheusRule when installed.

Usage:
    python scripts/check_chart.py          # every check, every value set; exit 1 on any problem
    python scripts/check_chart.py --fix    # first refresh the deploy/ copies of the dashboard and the rules
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

# kubernetes-validate re-reads its 1.8 MB definitions file on every call; caching the loader (its results are
# only read) turns seconds per value set into milliseconds.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = REPO_ROOT / "helm" / "mosaic"
RELEASE = "mosaic"
NAMESPACE = "mosaic"
# The chart's floor (Chart.yaml kubeVersion is >=1.27) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27", kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()))

# The chart's files that must stay byte-identical to their copies outside it (chart file -> copy).
COPIES = {
    CHART_DIR / "dashboards" / "mosaic-dashboard.json": REPO_ROOT / "deploy" / "grafana" / "mosaic-dashboard.json",
    CHART_DIR / "rules" / "mosaic-alerts.yaml": REPO_ROOT / "deploy" / "prometheus" / "alerts.yaml",
}
YAMLLINT_FILES = (
    CHART_DIR / "Chart.yaml",
    CHART_DIR / "values.yaml",
    CHART_DIR / "rules" / "mosaic-alerts.yaml",
    *sorted((REPO_ROOT / "deploy").rglob("*.yaml")),
    REPO_ROOT / ".yamllint",
)

_FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
# Value sets CI renders. "all-enabled" turns on every optional part and narrows the NetworkPolicies;
# "external-redis" uses existing Secrets.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "all-enabled": {
        "engine": {
            "workerGpus": 0.5,
            "hostBudget": "48Gi",
            "serveOptions": {"query_concurrency": 8},
            "extra": {"eviction_policy": "heat"},
        },
        "diskTier": {
            "enabled": True,
            "budget": "100Gi",
            "volumeSize": "450Gi",
            "persistence": {"enabled": True},
        },
        "modelStorage": {"enabled": True, "existingClaim": "mosaic-models"},
        "ray": {
            "head": {"nodeSelector": {"pool": "cpu"}, "rayStartParams": {"object-store-memory": 1000000000}},
            "worker": {
                "replicas": 2,
                "gpusPerPod": 2,
                "runtimeClassName": "nvidia",
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"},
                "resources": {"requests": {"memory": "256Gi"}, "limits": {"memory": "256Gi"}},
            },
        },
        "history": {"size": "1000Gi"},
        "router": {
            "replicas": 1,
            "workerStartTimeoutSeconds": 900,
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
        },
        "ingress": {"enabled": True, "className": "nginx", "tlsSecretName": "mosaic-ingress-tls"},
        "networkPolicy": {
            "clients": [
                {"ipBlock": {"cidr": "10.0.0.0/8"}},
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}},
            ],
            "metricsFrom": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                }
            ],
        },
        "auth": {"enabled": True, "apiKey": "test-key"},
        "tls": {"enabled": True, "cert": _FAKE_PEM, "key": _FAKE_PEM},
        "redis": {"auth": {"password": "s3cret"}},
        "imagePullSecrets": [{"name": "registry"}],
        "monitoring": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
            "dashboard": {"enabled": True},
        },
    },
    "external-redis": {
        "redis": {"enabled": False},
        "externalRedis": {"existingSecret": "mosaic-redis-url"},
        "auth": {"enabled": True, "existingSecret": "mosaic-api-key"},
        "tls": {"enabled": True, "existingSecret": "mosaic-router-tls"},
    },
}


def render(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> dict[str, str]:
    """Renders the chart offline; returns template path -> rendered text (NOTES.txt included).

    Raises:
        helm_python.HelmError: a template failed (including the chart's own `fail`/`required` checks).
    """
    with helm_python.Chart.load(CHART_DIR) as chart:
        chart.validate_schema(values or {})
        return chart.render(values or {}, name=release, namespace=NAMESPACE, is_install=True)


def render_manifests(values: dict[str, Any] | None = None, *, release: str = RELEASE) -> list[dict[str, Any]]:
    """Renders the chart and parses every non-empty YAML document (NOTES.txt excluded)."""
    docs = []
    for path, text in sorted(render(values, release=release).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def lint(values: dict[str, Any] | None = None, *, kube_version: str = KUBE_VERSIONS[-1]) -> list[str]:
    """`helm lint --strict`: every warning or error, as text (the icon recommendation is info only)."""
    report = helm_python.lint(CHART_DIR, values or {}, strict=True, kube_version=f"v{kube_version}.0")
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return problems + list(report["errors"])


def _validate_builtin(doc: dict[str, Any], kube_version: str) -> str | None:
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(str(p) for p in e.path)}: {e.message}"
    return None


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


# The CRD structures below are tables; keep them dense.
# fmt: off
_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_ANY_OBJ = {"type": "object"}
# Prometheus Operator's Duration pattern.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
             r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
# Pod templates are checked separately against Kubernetes' own PodTemplateSpec schema.
_POD_TEMPLATE = _ANY_OBJ

# KubeRay ray.io/v1 RayCluster (ray-operator/apis/ray/v1/raycluster_types.go): the fields of KubeRay 1.1,
# with the fields that were required there still required, so the chart works from KubeRay 1.1 on.
_WORKER_GROUP = _obj(
    {
        "groupName": _STR, "replicas": _INT, "minReplicas": _INT, "maxReplicas": _INT, "numOfHosts": _INT,
        "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE,
        "scaleStrategy": _obj({"workersToDelete": {"type": "array", "items": _STR}}),
    },
    required=("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"),
)
_RAYCLUSTER_SPEC = _obj(
    {
        "rayVersion": _STR, "enableInTreeAutoscaling": _BOOL, "autoscalerOptions": _ANY_OBJ,
        "headServiceAnnotations": _STR_MAP, "suspend": _BOOL,
        "headGroupSpec": _obj(
            {"serviceType": _STR, "headService": _ANY_OBJ, "enableIngress": _BOOL, "rayStartParams": _STR_MAP,
             "template": _POD_TEMPLATE},
            required=("rayStartParams", "template"),
        ),
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
    },
    required=("headGroupSpec",),
)
# Prometheus Operator monitoring.coreos.com/v1 (pkg/apis/monitoring/v1): the fields stable since 0.60.
_RELABEL = _obj({
    "sourceLabels": {"type": "array", "items": _STR}, "separator": _STR, "targetLabel": _STR, "regex": _STR,
    "modulus": _INT, "replacement": _STR,
    "action": {"enum": ["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                        "uppercase", "keepequal", "dropequal"]},
})
_ENDPOINT = _obj({
    "port": _STR, "targetPort": {"type": ["string", "integer"]}, "path": _STR,
    "scheme": {"enum": ["http", "https"]}, "params": _ANY_OBJ, "interval": _DURATION,
    "scrapeTimeout": _DURATION, "tlsConfig": _ANY_OBJ, "bearerTokenSecret": _ANY_OBJ,
    "authorization": _ANY_OBJ, "basicAuth": _ANY_OBJ, "oauth2": _ANY_OBJ, "honorLabels": _BOOL,
    "honorTimestamps": _BOOL, "metricRelabelings": {"type": "array", "items": _RELABEL},
    "relabelings": {"type": "array", "items": _RELABEL},
    "proxyUrl": _STR, "followRedirects": _BOOL, "enableHttp2": _BOOL, "filterRunning": _BOOL,
})
_SERVICEMONITOR_SPEC = _obj(
    {
        "endpoints": {"type": "array", "items": _ENDPOINT, "minItems": 1}, "selector": _ANY_OBJ,
        "namespaceSelector": _obj({"any": _BOOL, "matchNames": {"type": "array", "items": _STR}}),
        "jobLabel": _STR, "targetLabels": {"type": "array", "items": _STR},
        "podTargetLabels": {"type": "array", "items": _STR}, "sampleLimit": _INT, "targetLimit": _INT,
        "labelLimit": _INT, "attachMetadata": _ANY_OBJ,
    },
    required=("selector",),
)
_RULE = _obj(
    {"record": _STR, "alert": _STR, "expr": {"type": ["string", "integer"]}, "for": _DURATION,
     "keep_firing_for": _DURATION, "labels": _STR_MAP, "annotations": _STR_MAP},
    required=("expr",),
)
_RULE["oneOf"] = [{"required": ["record"]}, {"required": ["alert"]}]
_PROMETHEUSRULE_SPEC = _obj({
    "groups": {"type": "array", "items": _obj(
        {"name": {"type": "string", "minLength": 1}, "interval": _DURATION, "limit": _INT,
         "partial_response_strategy": _STR, "rules": {"type": "array", "items": _RULE}},
        required=("name",),
    )},
})
# fmt: on
CRD_SPECS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayCluster"): _RAYCLUSTER_SPEC,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _SERVICEMONITOR_SPEC,
    ("monitoring.coreos.com/v1", "PrometheusRule"): _PROMETHEUSRULE_SPEC,
}


def _validate_custom(doc: dict[str, Any], kube_version: str) -> list[str]:
    """Checks a custom resource: its spec against CRD_SPECS, and the built-in types it embeds (metadata,
    pod templates, label selectors) against Kubernetes' schemas by wrapping them in built-in objects."""
    problems = []
    extra = set(doc) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        problems.append(f"unexpected top-level fields {sorted(extra)}")
    for error in jsonschema.Draft202012Validator(CRD_SPECS[(doc["apiVersion"], doc["kind"])]).iter_errors(
        doc.get("spec", {})
    ):
        problems.append(f"spec.{'.'.join(str(p) for p in error.path)}: {error.message}")
    embedded = [("metadata", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})})]
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        groups = [("headGroupSpec", spec.get("headGroupSpec", {}))]
        groups += [(f"workerGroupSpecs.{i}", g) for i, g in enumerate(spec.get("workerGroupSpecs", []))]
        for where, group in groups:
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": group.get("template", {}),
            }
            embedded.append((f"spec.{where}.template", wrapped))
    if doc["kind"] == "ServiceMonitor":
        wrapped = {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": {"name": "s"},
            "spec": {"selector": spec.get("selector", {})},
        }
        embedded.append(("spec.selector", wrapped))
    for where, wrapped in embedded:
        error = _validate_builtin(wrapped, kube_version)
        if error:
            problems.append(f"{where}: {error}")
    return problems


def validate(manifests: list[dict[str, Any]], kube_version: str = KUBE_VERSIONS[-1]) -> list[str]:
    """Strict schema validation of every manifest; returns one line per problem."""
    problems = []
    for doc in manifests:
        if (doc.get("apiVersion"), doc.get("kind")) in CRD_SPECS:
            problems += [f"{_name(doc)}: {p}" for p in _validate_custom(doc, kube_version)]
            continue
        try:
            error = _validate_builtin(doc, kube_version)
        except kubernetes_validate.SchemaNotFoundError as e:
            error = e.message
        if error:
            problems.append(f"{_name(doc)} (Kubernetes {kube_version}): {error}")
    return problems


def promtool_check(manifests: list[dict[str, Any]]) -> list[str]:
    """`promtool check rules` on the rendered PrometheusRule groups; [] when there are none."""
    rules = [doc for doc in manifests if doc.get("kind") == "PrometheusRule"]
    promtool = shutil.which("promtool")
    if not rules or promtool is None:
        return []
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for doc in rules:
            path = Path(tmp) / "rules.yaml"
            path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
            result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
            if result.returncode != 0:
                problems.append(f"{_name(doc)}: promtool: {result.stdout}{result.stderr}")
    return problems


def check_copies(*, fix: bool = False) -> list[str]:
    """The chart's dashboard and rules must equal their deploy/ copies; `fix` copies the chart's over."""
    problems = []
    for source, copy in COPIES.items():
        if copy.exists() and filecmp.cmp(source, copy, shallow=False):
            continue
        if fix:
            shutil.copyfile(source, copy)
        else:
            problems.append(f"{copy.relative_to(REPO_ROOT)} differs from {source.relative_to(REPO_ROOT)} (--fix)")
    return problems


def yamllint_problems(paths: tuple[Path, ...] = YAMLLINT_FILES) -> list[str]:
    """yamllint with the repository's .yamllint; warnings count as problems."""
    config = YamlLintConfig(file=str(REPO_ROOT / ".yamllint"))
    problems = []
    for path in paths:
        for p in linter.run(path.read_text(), config, str(path)):
            problems.append(f"{path.relative_to(REPO_ROOT)}:{p.line}:{p.column}: {p.level}: {p.desc} ({p.rule})")
    return problems


def check_all(*, fix: bool = False) -> list[str]:
    """Every check on every value set and Kubernetes version; returns the problems found."""
    problems = check_copies(fix=fix) + yamllint_problems()
    for name, values in VALUE_SETS.items():
        problems += [f"[{name}] lint: {p}" for p in lint(values)]
        try:
            manifests = render_manifests(values)
        except helm_python.HelmError as e:
            problems.append(f"[{name}] render: {e}")
            continue
        for kube_version in KUBE_VERSIONS:
            problems += [f"[{name}] {p}" for p in validate(manifests, kube_version)]
        problems += [f"[{name}] {p}" for p in promtool_check(manifests)]
        print(
            f"{name}: {len(manifests)} manifests rendered, linted and validated against Kubernetes "
            f"{', '.join(KUBE_VERSIONS)}"
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fix", action="store_true", help="refresh deploy/ copies of the dashboard and rules")
    args = parser.parse_args(argv)
    if shutil.which("promtool") is None:
        print("note: promtool not found; the rendered PrometheusRule is not checked by promtool")
    problems = check_all(fix=args.fix)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
