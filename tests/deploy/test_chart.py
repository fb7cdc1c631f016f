"""The Helm chart, rendered offline: lint, schema validation, toggles both ways, and what the pods run."""

from __future__ import annotations

import base64
import copy
import inspect
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "mosaic"
GIB = 1024**3
VALUE_SET_NAMES = ("default", "all-enabled", "external-redis")


def _find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]


def _one(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = _find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _router(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(manifests, "Deployment", "mosaic-router")["spec"]["template"]["spec"]["containers"][0]


def _worker_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(manifests, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]


def _engine_config(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(_one(manifests, "ConfigMap", "mosaic-engine")["data"]["engine.yaml"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def render(check_chart):
    """render_manifests, memoised per values: many tests render the same few value sets."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def render_manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        key = json.dumps(values or {}, sort_keys=True)
        if key not in cache:
            cache[key] = check_chart.render_manifests(values)
        return copy.deepcopy(cache[key])

    return render_manifests


# ---- lint, validation, yamllint -------------------------------------------------------------------------


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_lint_strict(check_chart, name: str) -> None:
    assert check_chart.lint(check_chart.VALUE_SETS[name]) == []


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_manifests_validate_against_current_kubernetes(check_chart, rendered, name: str) -> None:
    assert check_chart.validate(rendered[name], check_chart.KUBE_VERSIONS[-1]) == []


def test_manifests_validate_against_the_oldest_supported_kubernetes(check_chart, rendered) -> None:
    assert check_chart.validate(rendered["all-enabled"], check_chart.KUBE_VERSIONS[0]) == []


def test_custom_resources_get_the_crd_structure_check(check_chart, rendered) -> None:
    """No installed package ships the KubeRay or Prometheus Operator CRD schemas, so these three kinds are
    checked against check_chart.CRD_SPECS; every other kind must have a Kubernetes schema (validate() reports
    a kind it has no schema for)."""
    custom = {(m["apiVersion"], m["kind"]) for m in rendered["all-enabled"] if "." in m["apiVersion"].split("/")[0]}
    crds = {("ray.io/v1", "RayCluster"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
    crds.add(("monitoring.coreos.com/v1", "PrometheusRule"))
    assert crds <= custom and crds == set(check_chart.CRD_SPECS)
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert check_chart.validate([unknown]), "a kind without any schema must be reported, not passed"


def test_lint_reports_problems(check_chart) -> None:
    assert check_chart.lint({"engine": {"mode": "fast"}})


@pytest.mark.parametrize(
    ("kind", "path", "value", "expected"),
    [
        ("Deployment", ["spec", "template", "spec", "containers", 0, "grcpProbe"], {}, "grcpProbe"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "gpus"], 1, "gpus"),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "gpu"], 1, "gpu"),
        ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "nodeSelector"], "x", "nodeSelector"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "interval"], "15 seconds", "interval"),
        ("ServiceMonitor", ["spec", "selector", "matchLabel"], {}, "matchLabel"),
        ("ServiceMonitor", ["spec", "endpoints", 0, "relabelings", 0, "target_label"], "job", "target_label"),
        ("PrometheusRule", ["spec", "groups", 0, "rules", 0, "expresion"], "up", "expresion"),
        ("PrometheusRule", ["metadata", "labelz"], {}, "labelz"),
    ],
)
def test_validation_catches_mistakes(check_chart, rendered, kind, path, value, expected) -> None:
    """The validators are strict: a misspelt or mistyped field anywhere is reported."""
    manifest = copy.deepcopy(_one(rendered["all-enabled"], kind))
    assert check_chart.validate([manifest]) == []
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    problems = check_chart.validate([manifest])
    assert problems and any(expected in p for p in problems), problems


def test_yamllint_clean(check_chart) -> None:
    assert check_chart.yamllint_problems() == []


def test_deploy_copies_are_identical(check_chart) -> None:
    assert check_chart.check_copies() == []


def test_rendered_prometheus_rule_passes_promtool(check_chart, rendered) -> None:
    rule = _one(rendered["all-enabled"], "PrometheusRule")
    # 2 pods x 2 GPUs / 0.5 GPU per actor.
    record = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record") == "mosaic:workers_expected")
    assert record["expr"] == "vector(8)"
    assert check_chart.promtool_check(rendered["all-enabled"]) == []


# ---- toggles, both ways -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "off", "kind"),
    [
        ({"monitoring": {"serviceMonitor": {"enabled": True}}}, {}, "ServiceMonitor"),
        ({"monitoring": {"prometheusRule": {"enabled": True}}}, {}, "PrometheusRule"),
        ({"ingress": {"enabled": True}}, {}, "Ingress"),
        (
            {"serviceAccount": {"create": True}},
            {"serviceAccount": {"create": False, "name": "x"}},
            "ServiceAccount",
        ),
        ({}, {"redis": {"enabled": False}, "externalRedis": {"existingSecret": "r"}}, "StatefulSet"),
    ],
)
def test_optional_resources_follow_their_flag(render, on, off, kind) -> None:
    assert len(_find(render(on), kind)) == 1
    assert _find(render(off), kind) == []


def test_dashboard_configmap(render) -> None:
    assert _find(render({}), "ConfigMap", "mosaic-dashboard") == []
    dashboard = _one(render({"monitoring": {"dashboard": {"enabled": True}}}), "ConfigMap", "mosaic-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (REPO_ROOT / "deploy" / "grafana" / "mosaic-dashboard.json").read_text()
    assert dashboard["data"]["mosaic-dashboard.json"] == source.rstrip("\n")


def test_bundled_redis(render) -> None:
    manifests = render({})
    statefulset = _one(manifests, "StatefulSet", "mosaic-redis")
    assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    headless = _one(manifests, "Service", "mosaic-redis-headless")
    assert headless["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == "mosaic-redis-headless"
    secret = _one(manifests, "Secret", "mosaic-redis")
    assert len(secret["data"]["redis-password"]) > 20
    redis = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert "requirepass" in redis["command"][-1] and "$REDIS_PASSWORD" in redis["command"][-1]
    assert _env(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mosaic-redis"
    env = _env(_router(manifests))
    assert env["MOSAIC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "mosaic-redis",
        "key": "redis-password",
    }
    assert (
        env["MOSAIC_REDIS_URL"]["value"] == "redis://:$(MOSAIC_REDIS_PASSWORD)@mosaic-redis-headless.mosaic.svc:6379/0"
    )
    no_pvc = _one(render({"redis": {"persistence": {"enabled": False}}}), "StatefulSet")
    assert "volumeClaimTemplates" not in no_pvc["spec"]
    assert {"name": "data", "emptyDir": {}} in no_pvc["spec"]["template"]["spec"]["volumes"]
    existing = render({"redis": {"auth": {"existingSecret": "my-redis", "existingSecretKey": "pw"}}})
    assert _find(existing, "Secret", "mosaic-redis") == []
    assert _env(_router(existing))["MOSAIC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "my-redis",
        "key": "pw",
    }


@pytest.mark.parametrize(
    ("answer", "alive", "ready"),
    [("PONG", True, True), ("LOADING Redis is loading the dataset in memory", True, False), ("", False, False)],
    ids=["serving", "loading", "silent"],
)
def test_bundled_redis_stays_alive_while_it_loads_its_data(render, tmp_path, answer, alive, ready) -> None:
    """Redis answers LOADING while it replays its append-only file, for as long as the file takes: the liveness
    probe must not kill it then (it would never finish), and readiness waits for PONG. Each probe's own command
    runs here, against a redis-cli that answers as Redis would."""
    redis = _one(render({}), "StatefulSet", "mosaic-redis")["spec"]["template"]["spec"]["containers"][0]
    fake = tmp_path / "redis-cli"
    fake.write_text(f"#!/bin/sh\necho '{answer}'\n")
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for probe, expected in (("livenessProbe", alive), ("readinessProbe", ready)):
        command = redis[probe]["exec"]["command"]
        assert (subprocess.run(command, env=env, check=False).returncode == 0) is expected, (probe, answer)


def test_external_redis(rendered) -> None:
    manifests = rendered["external-redis"]
    assert _find(manifests, "StatefulSet") == [] and _find(manifests, "Service", "mosaic-redis-headless") == []
    assert not [s for s in _find(manifests, "Secret") if "redis" in s["metadata"]["name"]]
    env = _env(_router(manifests))
    assert env["MOSAIC_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "mosaic-redis-url",
        "key": "redis-url",
    }
    assert "MOSAIC_REDIS_PASSWORD" not in env


def _api_key_secret_volume(manifests: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Secret volume the router reads `--api-key-file` from, or None without the flag.

    Checks that the flag names the file of the volume's one item, mounted read-only and without subPath: the kubelet
    never updates a subPath mount, so a rotation through one would keep the old keys.
    """
    pod = _one(manifests, "Deployment", "mosaic-router")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    if "--api-key-file" not in args:
        return None
    path = args[args.index("--api-key-file") + 1]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True and "subPath" not in mount, mount
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert [item["path"] for item in volume["secret"]["items"]] == [path.removeprefix(mount["mountPath"] + "/")]
    return volume["secret"]


@pytest.mark.parametrize("enabled", [False, True])
def test_api_key(render, enabled: bool) -> None:
    manifests = render({"auth": {"enabled": enabled}})
    secrets = _find(manifests, "Secret", "mosaic-api-key")
    pod = _one(manifests, "Deployment", "mosaic-router")["spec"]["template"]["spec"]
    assert "MOSAIC_API_KEY" not in _env(_router(manifests)), "read once at start: a rotation would need a restart"
    if not enabled:
        assert secrets == [] and _api_key_secret_volume(manifests) is None
        assert not [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "mosaic-api-key"]
        return
    assert len(secrets) == 1 and len(secrets[0]["data"]["api-key"]) > 40  # generated, base64 of 40 characters
    secret = _api_key_secret_volume(manifests)
    assert secret is not None and secret["secretName"] == "mosaic-api-key"
    assert [item["key"] for item in secret["items"]] == ["api-key"]


def test_api_key_from_existing_secret(render, rendered) -> None:
    manifests = rendered["external-redis"]
    assert _find(manifests, "Secret", "mosaic-api-key") == []
    secret = _api_key_secret_volume(manifests)
    assert secret is not None and secret["secretName"] == "mosaic-api-key"
    assert [item["key"] for item in secret["items"]] == ["api-key"]
    manifests = render({"auth": {"enabled": True, "existingSecret": "my-keys", "existingSecretKey": "keys.txt"}})
    assert _find(manifests, "Secret", "mosaic-api-key") == []
    secret = _api_key_secret_volume(manifests)
    assert secret is not None and secret["secretName"] == "my-keys"
    assert [item["key"] for item in secret["items"]] == ["keys.txt"], "only the key the router reads is mounted"


def test_the_router_accepts_every_line_of_the_mounted_secret(render, tmp_path: Path, monkeypatch) -> None:
    """The Secret's value is the key file, one key a line: two lines while clients move to a new key. The volume is
    laid out as the kubelet would, and the router's own flags and config load over it."""
    from mosaic_core.cli import build_parser
    from services.api_keys import ApiKeys
    from services.config import load_config

    manifests = render({"auth": {"enabled": True, "apiKey": "old-key\nnew-key\n"}})
    secret = _api_key_secret_volume(manifests)
    assert secret is not None
    data = _one(manifests, "Secret", "mosaic-api-key")["data"]
    pod = _one(manifests, "Deployment", "mosaic-router")["spec"]["template"]["spec"]
    args = build_parser().parse_args(pod["containers"][0]["args"])
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if args.api_key_file.startswith(m["mountPath"] + "/")]
    for item in secret["items"]:
        (tmp_path / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
    key_file = tmp_path / args.api_key_file.removeprefix(mount["mountPath"] + "/")
    config_file = tmp_path / "engine.yaml"
    config_file.write_text(_one(manifests, "ConfigMap", "mosaic-engine")["data"]["engine.yaml"])
    monkeypatch.setenv("MOSAIC_API_KEY", "stale-key")  # ignored beside a key file
    config = load_config(config_file, api_key_file=str(key_file))
    assert config.api_key is None
    keys = ApiKeys(path=config.api_key_file)
    assert keys.matches("old-key") and keys.matches("new-key") and not keys.matches("stale-key")


def test_a_new_api_key_in_the_values_leaves_the_router_running(render) -> None:
    """`helm upgrade` with a second key changes the Secret alone: the kubelet updates the mounted file, and the
    router's pod template (which a change would roll, restarting every worker) stays the same."""

    def template(api_key: str) -> dict[str, Any]:
        manifests = render({"auth": {"enabled": True, "apiKey": api_key}})
        return _one(manifests, "Deployment", "mosaic-router")["spec"]["template"]

    assert template("old-key") == template("old-key\nnew-key\n")


def test_the_rotation_docs_name_the_file_and_the_log_line_of_the_router(rendered) -> None:
    """docs/deploy.md tells operators which flag the router runs with and which log line shows a new key taken."""
    from services import api_keys

    args = _router(rendered["all-enabled"])["args"]
    path = args[args.index("--api-key-file") + 1]
    docs = " ".join((REPO_ROOT / "docs" / "deploy.md").read_text().split())
    assert f"--api-key-file {path}" in docs
    assert inspect.getsource(api_keys).count('"API key file %s read again: %d key(s) accepted from now on"') == 1
    assert f"API key file {path} read again: 2 key(s) accepted from now on" in docs


def test_tls_off_uses_native_grpc_probes(rendered) -> None:
    router = _router(rendered["default"])
    assert "--tls-cert" not in router["args"]
    assert router["livenessProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert router["startupProbe"]["grpc"] == {"port": 50051, "service": ""}
    assert router["readinessProbe"]["grpc"] == {"port": 50051, "service": "mosaic.v1.Mosaic"}
    assert _find(rendered["default"], "Secret", "mosaic-tls") == []


@pytest.mark.parametrize("name", ["all-enabled", "external-redis"])
def test_tls_on_serves_tls_and_probes_over_it(rendered, name: str) -> None:
    manifests = rendered[name]
    router = _router(manifests)
    args = router["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/mosaic/tls/tls.crt"
    assert args[args.index("--tls-key") + 1] == "/etc/mosaic/tls/tls.key"
    probe = router["readinessProbe"]["exec"]["command"]
    assert probe[0] == "mosaic-healthcheck" and probe[-2:] == ["--service", "mosaic.v1.Mosaic"]
    assert "grpc" not in router["livenessProbe"] and "--tls-ca" in router["livenessProbe"]["exec"]["command"]
    volumes = _one(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    tls_secret = next(v["secret"]["secretName"] for v in volumes if v["name"] == "tls")
    if name == "all-enabled":
        secret = _one(manifests, "Secret", "mosaic-tls")
        assert secret["type"] == "kubernetes.io/tls" and tls_secret == "mosaic-tls"
        assert {"tls.crt", "tls.key", "ca.crt"} == set(secret["data"])
    else:
        assert _find(manifests, "Secret", "mosaic-tls") == [] and tls_secret == "mosaic-router-tls"


@pytest.mark.parametrize(("router_on", "workers_on"), [(True, True), (False, False)])
def test_pod_disruption_budgets(render, router_on: bool, workers_on: bool) -> None:
    manifests = render(
        {
            "router": {"podDisruptionBudget": {"enabled": router_on}},
            "ray": {"worker": {"podDisruptionBudget": {"enabled": workers_on}}},
        }
    )
    assert len(_find(manifests, "PodDisruptionBudget", "mosaic-router")) == int(router_on)
    assert len(_find(manifests, "PodDisruptionBudget", "mosaic-ray-worker")) == int(workers_on)
    if workers_on:
        pdb = _one(manifests, "PodDisruptionBudget", "mosaic-ray-worker")
        labels = _one(manifests, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_disk_tier(render, rendered) -> None:
    off = rendered["default"]
    assert "kv-disk" not in {v["name"] for v in _worker_pod(off)["volumes"]}
    assert _engine_config(off)["disk_budget_bytes"] == 0 and "disk_dir" not in _engine_config(off)
    local = render({"diskTier": {"enabled": True}})
    volume = next(v for v in _worker_pod(local)["volumes"] if v["name"] == "kv-disk")
    assert volume == {"name": "kv-disk", "emptyDir": {"sizeLimit": "50Gi"}}
    assert _engine_config(local)["disk_budget_bytes"] == 200 * GIB
    pvc = rendered["all-enabled"]
    volume = next(v for v in _worker_pod(pvc)["volumes"] if v["name"] == "kv-disk")
    claim = volume["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "450Gi" and claim["accessModes"] == ["ReadWriteOnce"]
    mounts = _worker_pod(pvc)["containers"][0]["volumeMounts"]
    assert {"name": "kv-disk", "mountPath": "/var/lib/mosaic/kv-disk"} in mounts
    assert _engine_config(pvc)["disk_dir"] == "/var/lib/mosaic/kv-disk"


def test_history_volume(render, rendered) -> None:
    default = rendered["default"]
    claim = _one(default, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # one worker pod
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volume = next(v for v in _worker_pod(default)["volumes"] if v["name"] == "history")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mounts = _worker_pod(default)["containers"][0]["volumeMounts"]
    assert {"name": "history", "mountPath": "/var/lib/mosaic/history"} in mounts
    assert _engine_config(default)["data_dir"] == "/var/lib/mosaic/history"
    assert _engine_config(default)["history_budget_bytes"] == 0
    assert (
        _engine_config(render({"history": {"enabled": True, "budget": "400Gi"}}))["history_budget_bytes"] == 400 * GIB
    )
    existing = render({"history": {"enabled": True, "existingClaim": "cams"}})
    assert _find(existing, "PersistentVolumeClaim") == []
    volume = next(v for v in _worker_pod(existing)["volumes"] if v["name"] == "history")
    assert volume["persistentVolumeClaim"]["claimName"] == "cams"
    off = render({"history": {"enabled": False}})
    assert _find(off, "PersistentVolumeClaim") == []
    assert next(v for v in _worker_pod(off)["volumes"] if v["name"] == "history") == {"name": "history", "emptyDir": {}}


@pytest.mark.parametrize(
    ("num_pods", "access_modes", "expected"),
    [
        (1, [], ["ReadWriteOnce"]),
        (2, [], ["ReadWriteMany"]),
        (1, ["ReadWriteMany"], ["ReadWriteMany"]),
        (1, ["ReadWriteOncePod"], ["ReadWriteOncePod"]),
        (3, ["ReadWriteOnce", "ReadWriteMany"], ["ReadWriteOnce", "ReadWriteMany"]),
    ],
)
def test_history_access_modes_follow_the_pods_that_mount_the_claim(render, num_pods, access_modes, expected) -> None:
    """Only worker pods mount the history claim (not the head, not the router): one needs no RWX storage."""
    manifests = render({"ray": {"worker": {"replicas": num_pods}}, "history": {"accessModes": access_modes}})
    assert _one(manifests, "PersistentVolumeClaim")["spec"]["accessModes"] == expected
    cluster = _one(manifests, "RayCluster")["spec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"], _one(manifests, "Deployment")["spec"]["template"]["spec"]]
    for pod in pods:
        assert "history" not in {v["name"] for v in pod.get("volumes", [])}


@pytest.mark.parametrize("access_modes", [["ReadWriteOnce"], ["ReadWriteOncePod"]])
def test_history_claim_several_pods_cannot_share_is_refused(render, access_modes) -> None:
    values = {"ray": {"worker": {"replicas": 2}}, "history": {"accessModes": access_modes}}
    with pytest.raises(helm_python.HelmError, match=r"ray\.worker\.replicas=2 worker pods"):
        render(values)
    values["history"]["existingClaim"] = "cams"  # its access modes are the owner's business
    assert _find(render(values), "PersistentVolumeClaim") == []


# ---- what the pods run ---------------------------------------------------------------------------------


def test_ray_cluster_gpu_workers(rendered) -> None:
    cluster = _one(rendered["all-enabled"], "RayCluster")
    group = cluster["spec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 2
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # Ray's object store must fit in /dev/shm, or Ray falls back to disk.
    assert group["rayStartParams"]["object-store-memory"] == str(16 * GIB * 4 // 5)
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["object-store-memory"] == "1000000000"  # not 1e+09
    assert "runtimeClassName" not in _worker_pod(rendered["default"])


def test_router_runs_mosaic_serve_against_the_ray_head(rendered) -> None:
    manifests = rendered["default"]
    router = _router(manifests)
    args = router["args"]
    assert "command" not in router, "the image's ENTRYPOINT (mosaic) must stay in charge"
    assert args[0] == "serve"
    cluster = _one(manifests, "RayCluster")["metadata"]["name"]
    # KubeRay names the head Service <raycluster>-head-svc; 10001 is the Ray client port.
    assert args[args.index("--ray-address") + 1] == f"ray://{cluster}-head-svc.mosaic.svc:10001"
    assert args[args.index("--config") + 1] == "/etc/mosaic/engine.yaml"
    assert "--redis-url" not in args and "--api-key" not in args, "secrets belong in env, not in argv"
    assert {p["name"]: p["containerPort"] for p in router["ports"]} == {"grpc": 50051, "metrics": 9464}
    service = _one(manifests, "Service", "mosaic-router")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 50051}
    metrics = _one(manifests, "Service", "mosaic-router-metrics")
    assert {p["name"]: p["port"] for p in metrics["spec"]["ports"]} == {"metrics": 9464}


def test_router_args_parse_with_the_real_cli(rendered) -> None:
    """Fails, not skips, until `mosaic serve` exists: the chart must never call flags the CLI lacks."""
    from mosaic_core.cli import build_parser

    for name in VALUE_SET_NAMES:
        build_parser().parse_args(_router(rendered[name])["args"])


def test_engine_config_is_accepted_by_the_service(rendered, tmp_path: Path) -> None:
    """`mosaic serve --config` loads the rendered file, and every worker gets a valid core EngineConfig."""
    from services.config import load_config

    for name in VALUE_SET_NAMES:
        path = tmp_path / f"{name}.yaml"
        path.write_text(_one(rendered[name], "ConfigMap", "mosaic-engine")["data"]["engine.yaml"])
        config = load_config(path)
        engine = config.engine_config(worker_subdir="worker-0")
        assert engine.host_budget_bytes == _engine_config(rendered[name])["host_budget_bytes"]
        assert config.workers >= 1 and config.worker_gpus > 0


def test_engine_budgets_are_bytes(rendered) -> None:
    config = _engine_config(rendered["default"])
    assert config["host_budget_bytes"] == 64 * GIB and config["device_budget_bytes"] == 40 * GIB
    assert config["max_message_bytes"] == 16 * 1024**2
    assert config["workers"] == 1
    config = _engine_config(rendered["all-enabled"])
    assert config["workers"] == 8 and config["host_budget_bytes"] == 48 * GIB
    assert config["engine"]["eviction_policy"] == "heat" and config["query_concurrency"] == 8


def test_a_device_budget_share_reaches_the_service_and_is_left_out_by_default(render, rendered, tmp_path) -> None:
    from services.config import load_config

    assert "device_budget_share" not in _engine_config(rendered["default"])
    path = tmp_path / "engine.yaml"
    path.write_text(
        _one(render({"engine": {"deviceBudgetShare": 0.8}}), "ConfigMap", "mosaic-engine")["data"]["engine.yaml"]
    )
    assert load_config(path).device_budget_share == 0.8


def test_sizing_example_of_the_docs_renders(render) -> None:
    """docs/deploy.md's worked example (100 cameras on 4 GPUs) is a valid values file."""
    manifests = render(
        {
            "engine": {"deviceBudget": "24Gi", "hostBudget": "160Gi"},
            "diskTier": {"enabled": True, "budget": "2500Gi", "volumeSize": "50Gi"},
            "history": {"size": "10500Gi"},
            "ray": {"worker": {"replicas": 4, "resources": {"limits": {"memory": "224Gi"}}}},
        }
    )
    config = _engine_config(manifests)
    assert config["workers"] == 4 and config["host_budget_bytes"] == 160 * GIB
    assert config["disk_budget_bytes"] == 2500 * GIB


def test_config_change_rolls_the_router(render) -> None:
    def checksum(values):
        return _one(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/engine-config"
        ]

    assert checksum({}) != checksum({"engine": {"hostBudget": "32Gi"}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ray": {"worker": {"resources": {"limits": {"memory": "64Gi"}}}}}, "limits.memory"),
        ({"diskTier": {"enabled": True, "budget": "600Gi"}}, "history.size=500Gi is below diskTier.budget x 1"),
        ({"engine": {"serveOptions": {"data_dir": "/tmp"}}}, "engine.serveOptions.data_dir is set by the chart"),
        ({"engine": {"serveOptions": {"api_key": "k"}}}, "engine.serveOptions.api_key is set by the chart"),
        ({"engine": {"serveOptions": {"api_key_file": "/k"}}}, "engine.serveOptions.api_key_file is set by the chart"),
        ({"engine": {"workerGpus": 2}}, "no worker actor fits"),
        ({"modelStorage": {"enabled": True}}, "modelStorage.existingClaim"),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(render, values, message: str) -> None:
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)


@pytest.mark.parametrize(
    "values",
    [
        {"engine": {"mode": "fast"}},
        {"engine": {"hostBudget": "64GB"}},
        {"ray": {"worker": {"replicas": 0}}},
        {"router": {"grpcPort": 70000}},
        {"router": {"service": {"type": "Ingress"}}},
        {"redis": {"enabled": False}},
        {"tls": {"enabled": True}},
        {"redis": {"auth": {"password": "p@ss word"}}},
        {"monitoring": {"serviceMonitor": {"interval": "15 seconds"}}},
        {"replicaCount": 3},
        {"router": {"replicas": 2}},
        {"ray": {"worker": {"groupName": ""}}},  # would render `groupName: null`, which no RayCluster takes
    ],
)
def test_schema_rejects_bad_values(render, values) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


# ---- chart conventions ---------------------------------------------------------------------------------


def test_values_are_camel_case_with_a_comment_above_each() -> None:
    lines = (CHART_DIR / "values.yaml").read_text().splitlines()
    key = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9]*):")

    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    for i, line in enumerate(lines):
        match = key.match(line)
        if not match:
            continue
        parent = next((p for p in reversed(lines[:i]) if p.strip() and indent(p) < indent(line)), "")
        if parent.lstrip().startswith("-"):
            continue  # a field of a list item (a toleration, say), documented by the list's comment
        name = match.group(2)
        assert re.fullmatch(r"[a-z][a-zA-Z0-9]*", name), f"values.yaml:{i + 1}: {name} is not camelCase"
        assert lines[i - 1].strip().startswith("#"), f"values.yaml:{i + 1}: {name} has no comment above it"


def test_one_resource_per_template_named_kind_component(check_chart) -> None:
    rendered = check_chart.render(check_chart.VALUE_SETS["all-enabled"])
    for path, text in rendered.items():
        file = Path(path).name
        if file == "NOTES.txt":
            continue
        docs = [d for d in yaml.safe_load_all(text) if d]
        assert len(docs) == 1, f"{file} renders {len(docs)} resources"
        assert file.startswith(docs[0]["kind"].lower() + "-"), f"{file} holds a {docs[0]['kind']}"
        assert not [line for line in text.splitlines() if line != line.rstrip()], f"{file}: trailing whitespace"


def test_helpers_are_prefixed_with_the_chart_name() -> None:
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    names = re.findall(r'define "([^"]+)"', helpers)
    assert names and all(n.startswith("mosaic.") for n in names)


def test_every_resource_carries_the_standard_labels(rendered) -> None:
    for manifest in rendered["all-enabled"]:
        labels = manifest["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == "mosaic", manifest["metadata"]["name"]
        assert labels.get("app.kubernetes.io/name") == "mosaic"


def test_long_release_names_stay_within_kubernetes_limits(check_chart) -> None:
    manifests = check_chart.render_manifests(check_chart.VALUE_SETS["all-enabled"], release="r" * 53)
    for manifest in manifests:
        name = manifest["metadata"]["name"]
        assert len(name) <= 63, name
        if manifest["kind"] == "RayCluster":
            assert len(f"{name}-head-svc") <= 63  # the Service KubeRay creates


def test_notes_tell_how_to_reach_the_service(check_chart) -> None:
    notes = check_chart.render({})["mosaic/templates/NOTES.txt"]
    assert "mosaic-router.mosaic.svc:50051" in notes and "port-forward service/mosaic-router 50051" in notes
    notes = check_chart.render(check_chart.VALUE_SETS["all-enabled"])["mosaic/templates/NOTES.txt"]
    assert "x-api-key" in notes and "mosaic.example.com:443" in notes


def test_the_router_is_replaced_not_doubled_and_waits_as_long_as_the_values_say(render) -> None:
    """A second router pod beside the first (a rolling update) would start worker actors no GPU is left for."""
    manifests = render({"router": {"workerStartTimeoutSeconds": 900, "terminationGracePeriodSeconds": 90}})
    assert _one(manifests, "Deployment", "mosaic-router")["spec"]["strategy"] == {"type": "Recreate"}
    config = _engine_config(manifests)
    assert (config["worker_start_timeout_s"], config["shutdown_grace_s"]) == (900, 70)
    assert _engine_config(render({"router": {"terminationGracePeriodSeconds": 10}}))["shutdown_grace_s"] == 5


@pytest.mark.parametrize(("tls", "protocol"), [(False, "GRPC"), (True, "GRPCS")])
def test_the_ingress_speaks_to_the_router_as_it_serves(render, tls: bool, protocol: str) -> None:
    values = {"ingress": {"enabled": True}}
    if tls:
        values["tls"] = {"enabled": True, "cert": "c", "key": "k"}
    annotations = _one(render(values), "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == protocol
    values["ingress"]["annotations"] = {"nginx.ingress.kubernetes.io/backend-protocol": "HTTP"}
    annotations = _one(render(values), "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTP"


def test_the_ray_dashboard_listens_inside_the_head_pod_only(rendered) -> None:
    for manifests in rendered.values():
        params = _one(manifests, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"]
        assert params["dashboard-host"] == "127.0.0.1"


def _ray_containers(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cluster = _one(manifests, "RayCluster")["spec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    return [head, _worker_pod(manifests)["containers"][0], _router(manifests)]


def test_every_ray_process_and_the_router_share_one_ray_token(render, rendered) -> None:
    """Ray's token authentication (checked on the CPU with Ray 2.60: a Ray client without the token is refused)."""
    secret = _one(rendered["default"], "Secret", "mosaic-ray-token")
    token_key = next(iter(secret["data"]))
    for container in _ray_containers(rendered["default"]):
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mosaic-ray-token", "key": token_key}
    existing = render({"ray": {"auth": {"enabled": True, "existingSecret": "mine", "existingSecretKey": "t"}}})
    assert _find(existing, "Secret", "mosaic-ray-token") == []
    for container in _ray_containers(existing):
        assert _env(container)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "t"}
    off = render({"ray": {"auth": {"enabled": False, "existingSecret": "", "existingSecretKey": "auth_token"}}})
    assert _find(off, "Secret", "mosaic-ray-token") == []
    for container in _ray_containers(off):
        assert "RAY_AUTH_MODE" not in _env(container) and "RAY_AUTH_TOKEN" not in _env(container)


@pytest.mark.parametrize("tls", [False, True])
def test_every_probe_takes_its_timeout_from_the_values(render, tls: bool) -> None:
    """The schema accepts timeoutSeconds for each of the three probes, so none may drop it. Left unset, a probe gets
    kubelet's 1 s: under TLS the exec health check (a Python process importing grpc, with its own 3 s deadline)
    can take longer than that on a busy node, and 120 such failures restart the router in a loop."""
    values: dict[str, Any] = {
        "router": {"probes": {p: {"timeoutSeconds": 7} for p in ("startup", "liveness", "readiness")}}
    }
    if tls:
        values["tls"] = {"enabled": True, "cert": "c", "key": "k"}
    router = _router(render(values))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert router[probe]["timeoutSeconds"] == 7, probe
    defaults = _router(render({"tls": values["tls"]} if tls else {}))
    assert defaults["startupProbe"]["timeoutSeconds"] == defaults["livenessProbe"]["timeoutSeconds"] == 5


@pytest.mark.parametrize("option", ["host", "grpc_port", "metrics_port", "ray_address", "tls_cert", "tls_key"])
def test_serve_options_the_router_flags_set_are_refused(render, option: str) -> None:
    """The router's command line sets these, and `mosaic serve` lets a flag win over the config file: in
    engine.serveOptions they would be ignored without a word (or, tls_* with tls.enabled off, turn on TLS that the
    native gRPC probes cannot speak). values.yaml promises such keys are refused."""
    with pytest.raises(helm_python.HelmError, match=re.escape(f"engine.serveOptions.{option} is set by the chart")):
        render({"engine": {"serveOptions": {option: "x"}}})


@pytest.mark.parametrize(
    "values",
    [
        {"history": {"budget": "1.5Ti"}},
        {"history": {"size": "2.5Ti"}, "diskTier": {"enabled": True, "budget": "1Ti"}},
        {"ray": {"worker": {"shmSize": "1.5Gi"}}},
        {"ray": {"head": {"shmSize": "2.5Gi"}}},
        {"ray": {"worker": {"resources": {"limits": {"memory": "200.5Gi"}}}}},
    ],
    ids=["history.budget", "history.size", "worker.shmSize", "head.shmSize", "worker.limits.memory"],
)
def test_decimal_quantities_the_schema_accepts_render(check_chart, render, values) -> None:
    """values.schema.json takes these as Kubernetes quantities, decimals included ("1.5Gi"); the chart must then
    turn them into bytes, not fail the install saying they are not byte sizes."""
    manifests = render(values)
    assert check_chart.validate(manifests) == []


def test_decimal_quantities_become_the_bytes_they_name(render) -> None:
    manifests = render({"history": {"budget": "1.5Ti"}, "ray": {"worker": {"shmSize": "1.5Gi"}}})
    assert _engine_config(manifests)["history_budget_bytes"] == 3 * 1024**4 // 2
    params = _one(manifests, "RayCluster")["spec"]["workerGroupSpecs"][0]["rayStartParams"]
    assert params["object-store-memory"] == str(3 * GIB // 2 * 4 // 5)


@pytest.mark.parametrize(("size", "expected"), [("010Gi", 10 * GIB), ("08Gi", 8 * GIB), ("064", 64)])
def test_byte_sizes_with_leading_zeros_keep_their_decimal_value(render, size: str, expected: int) -> None:
    """The schema's byte patterns accept leading zeros, and Kubernetes reads "010Gi" as 10Gi. Sprig's int64 parses
    a leading 0 as octal: "010Gi" became 8 GiB and "08Gi" (no octal number) 0 bytes, a host tier of nothing."""
    values = {"engine": {"hostBudget": size}, "ray": {"worker": {"resources": {"limits": {"memory": "1000Gi"}}}}}
    assert _engine_config(render(values))["host_budget_bytes"] == expected


@pytest.mark.parametrize(
    "field",
    [
        "target_tokens_per_frame",
        "local_window_tokens",
        "retrieval_budget_tokens",
        "mode",
        "host_budget_bytes",
        "device_budget_bytes",
        "disk_budget_bytes",
        "history_budget_bytes",
        "disk_dir",
        "data_dir",
    ],
)
def test_engine_extra_fields_the_chart_sets_are_refused(render, field: str) -> None:
    """The first three would be a second `engine:` key beside the chart's own (YAML keeps the last, so the value
    of engine.targetTokensPerFrame and friends was dropped); the rest `mosaic serve` overwrites from the top-level
    options the chart writes, so engine.extra's value was ignored without a word."""
    with pytest.raises(helm_python.HelmError, match=re.escape(f"engine.extra.{field} is set by the chart")):
        render({"engine": {"extra": {field: 1}}})


def test_engine_extra_fields_the_service_would_overwrite_are_the_refused_ones(tmp_path: Path) -> None:
    """The service's own list, checked: an `engine:` field that ServiceConfig.engine_config overwrites."""
    from services.config import load_config

    path = tmp_path / "engine.yaml"
    path.write_text("host_budget_bytes: 1024\nengine: {host_budget_bytes: 2048, data_dir: /elsewhere}\n")
    engine = load_config(path).engine_config()
    assert engine.host_budget_bytes == 1024 and engine.data_dir is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"engine": {"deviceBudget": 0}}, "engine.deviceBudget"),
        ({"engine": {"deviceBudget": "0Gi"}}, "engine.deviceBudget"),
        ({"engine": {"maxMessageBytes": 512}}, "engine.maxMessageBytes"),
        ({"router": {"grpcPort": 9464}}, "router.grpcPort"),
    ],
)
def test_values_mosaic_serve_refuses_at_start_fail_the_install(render, values, message: str) -> None:
    """device_budget_bytes must be above 0 and max_message_bytes at least 1024 (services.config), and the gRPC and
    metrics ports must differ (services.preflight): rendered, the router would exit at every start instead."""
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        render(values)
