"""Every container runs on a read-only root filesystem, and every path its processes write is on a volume.

What each process writes, and why (docs/security.md has the same list):
- Ray: its temp dir, /tmp/ray by default (`ray start --temp-dir`, which the chart does not pass): session files,
  logs and objects spilled from the object store; the object store itself in /dev/shm.
- Python, gcc (Triton builds its launchers at run time) and torch's inductor cache: /tmp.
- Caches under HOME: ~/.cache (Mosaic's tokenizer, torch, Hugging Face), ~/.triton, ~/.nv (CUDA), ~/.ray (Ray's
  token file). The image's HOME (deploy/Dockerfile's `useradd --home-dir`) is on the root filesystem.
- The engine: its data_dir and disk_dir (engine.yaml), on the workers.
- Redis: its append-only file in /data, and the config file its command writes to /tmp.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
VALUE_SET_NAMES = ("default", "all-enabled", "external-redis")
HOME_CACHES = (".cache/mosaic", ".cache/torch", ".cache/huggingface", ".triton/cache", ".nv/ComputeCache", ".ray")


def _image_home() -> str:
    match = re.search(r"--home-dir (\S+)", (REPO_ROOT / "deploy" / "Dockerfile").read_text())
    assert match, "deploy/Dockerfile no longer names the user's home with --home-dir; update this test"
    return match.group(1)


def _pods(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Pod name -> pod spec, for every pod template the chart renders."""
    pods = {}
    for doc in manifests:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = dict(doc["spec"]["template"]["spec"])
            # A StatefulSet's claim templates are volumes of its pods, of the templates' names.
            claims = [
                {"name": t["metadata"]["name"], "persistentVolumeClaim": {}}
                for t in doc["spec"].get("volumeClaimTemplates", [])
            ]
            pod["volumes"] = pod.get("volumes", []) + claims
            pods[doc["metadata"]["name"]] = pod
        elif doc["kind"] == "RayCluster":
            pods["ray-head"] = doc["spec"]["headGroupSpec"]["template"]["spec"]
            for group in doc["spec"]["workerGroupSpecs"]:
                pods[f"ray-worker-{group['groupName']}"] = group["template"]["spec"]
    return pods


def _writable(pod: dict[str, Any], container: dict[str, Any], path: str) -> bool:
    """Whether `path` is on a writable volume of the container: the deepest mount holding it is neither read-only
    nor a ConfigMap, Secret or read-only claim."""
    path = posixpath.normpath(path)
    holding = [
        m for m in container.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    if not holding:
        return False
    mount = max(holding, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = volume.get("persistentVolumeClaim")
    writable_source = "emptyDir" in volume or "ephemeral" in volume or (claim is not None and not claim.get("readOnly"))
    return bool(writable_source) and not mount.get("readOnly") and "subPath" not in mount


def _home(container: dict[str, Any]) -> str:
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    return env.get("HOME") or _image_home()


def _written_paths(pod_name: str, container: dict[str, Any], engine: dict[str, Any]) -> list[str]:
    if pod_name.endswith("-redis"):
        return ["/data", "/tmp/redis.conf"]
    home = _home(container)
    paths = ["/tmp", "/tmp/ray", *(f"{home}/{cache}" for cache in HOME_CACHES)]
    if pod_name.startswith("ray-"):
        paths.append("/dev/shm")
    if pod_name.startswith("ray-worker"):
        paths += [engine["data_dir"], *([engine["disk_dir"]] if engine.get("disk_dir") else [])]
    return paths


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_every_container_has_a_read_only_root_filesystem(rendered, name: str) -> None:
    pods = _pods(rendered[name])
    assert {"mosaic-router", "ray-head", "ray-worker-gpu"} <= set(pods)
    for pod_name, pod in pods.items():
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container.get("securityContext", {})
            assert context.get("readOnlyRootFilesystem") is True, f"{pod_name}/{container['name']}"
            assert context.get("allowPrivilegeEscalation") is False, f"{pod_name}/{container['name']}"


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_every_path_a_process_writes_is_on_a_writable_volume(rendered, name: str) -> None:
    manifests = rendered[name]
    [config] = [d for d in manifests if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mosaic-engine"]
    engine = yaml.safe_load(config["data"]["engine.yaml"])
    [cluster] = [d for d in manifests if d["kind"] == "RayCluster"]
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert "temp-dir" not in group["rayStartParams"], "Ray's temp dir is /tmp/ray, below, unless set"
    for pod_name, pod in _pods(manifests).items():
        [container] = pod["containers"]
        unwritable = [p for p in _written_paths(pod_name, container, engine) if not _writable(pod, container, p)]
        assert not unwritable, f"{pod_name} cannot write {unwritable} (HOME={_home(container)})"


def test_the_writability_check_sees_read_only_and_missing_mounts(rendered) -> None:
    """The check above is not blind: a read-only mount, a Secret, a subPath file and a path on no volume fail it."""
    pod = _pods(rendered["all-enabled"])["mosaic-router"]
    [router] = pod["containers"]
    assert _writable(pod, router, "/tmp/x")
    for path in ("/etc/mosaic/engine.yaml", "/etc/mosaic/tls/x", "/models/m", "/home/mosaic/.cache", "/tmp/../etc"):
        assert not _writable(pod, router, path), path


@pytest.mark.parametrize("group", ["head", "worker"])
@pytest.mark.parametrize(
    ("param", "directory", "accepted"),
    [
        ("temp-dir", "/tmp/ray-alt", True),
        ("temp-dir", "/var/lib/ray", False),
        ("temp-dir", "/tmp/../var/ray", False),
        ("temp-dir", "/tmpfs", False),
        ("plasma-directory", "/dev/shm", True),
        ("plasma-directory", "/plasma", False),
    ],
)
def test_ray_start_directories_must_be_on_a_volume(check_chart, group, param, directory, accepted) -> None:
    """A `ray start` directory on the read-only root would fail every start of the Ray pod; the chart refuses it at
    install with the value's name instead."""
    values = {"ray": {group: {"rayStartParams": {param: directory}}}}
    if not accepted:
        with pytest.raises(helm_python.HelmError, match=re.escape(f"ray.{group}.rayStartParams.{param}")):
            check_chart.render_manifests(values)
        return
    manifests = check_chart.render_manifests(values)
    pod = _pods(manifests)["ray-head" if group == "head" else "ray-worker-gpu"]
    assert _writable(pod, pod["containers"][0], directory)
