"""The container image definition: sources exist, context filtering, entrypoint and the gRPC health check."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
HEALTHCHECK = REPO_ROOT / "deploy" / "healthcheck.py"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined]


def _words(args: str) -> list[str]:
    """Exec (JSON) form or shell form of an instruction's arguments."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def _copy_sources() -> list[str]:
    sources = []
    for name, args in _instructions(DOCKERFILE.read_text()):
        if name not in ("COPY", "ADD"):
            continue
        words = _words(args) if args.startswith("[") else shlex.split(args)
        if any(w.startswith("--from") for w in words):
            continue  # copies out of another stage, not out of the build context
        sources += [w for w in words if not w.startswith("--")][:-1]
    return sources


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """One .dockerignore pattern as Docker reads it: rooted at the context, Go filepath.Match plus `**`."""
    pattern = pattern.strip("/")
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def is_excluded(path: str, ignore_text: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last matching pattern wins, and a pattern
    matching a parent directory matches everything below it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in ignore_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        regex = _dockerignore_regex(line.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def test_every_copied_source_exists_and_reaches_the_build_context() -> None:
    sources = _copy_sources()
    assert {"pyproject.toml", "mosaic_core", "services", "deploy/healthcheck.py"} <= set(sources)
    ignore = DOCKERIGNORE.read_text()
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"Dockerfile copies {source}, which is not in the repository"
        files = [path] if path.is_file() else [f for f in path.rglob("*.py") if "__pycache__" not in f.parts]
        assert files, f"{source} holds no files"
        for f in files:
            rel = f.relative_to(REPO_ROOT).as_posix()
            assert not is_excluded(rel, ignore), f"{rel} is copied by the Dockerfile but .dockerignore drops it"


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        "mosaic_core/__pycache__/cli.cpython-311.pyc",
        "services/gen/__pycache__/x.pyc",
        ".venv/bin/python",
        ".ruff_cache/0.6/x",
        ".hypothesis/examples/x",
        "tests/engine/test_engine.py",
        "bench/out/table.csv",
        "mosaic.egg-info/PKG-INFO",
        "helm/mosaic/Chart.yaml",
        "services/tls/server.key",
        ".env",
    ],
)
def test_dockerignore_keeps_junk_and_secrets_out(path: str) -> None:
    assert is_excluded(path, DOCKERIGNORE.read_text())


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher above is the evidence for the two tests before; check it on Docker's documented cases."""
    assert is_excluded("a/b/c.go", "**/*.go") and is_excluded("c.go", "**/*.go")
    assert is_excluded("temp/x", "temp") and not is_excluded("x/temp", "temp")
    assert not is_excluded("README.md", "*.md\n!README.md") and is_excluded("a.md", "*.md\n!README.md")


def test_image_is_multi_stage_non_root_and_installs_only_the_service_extra() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    stages = [args for name, args in instructions if name == "FROM"]
    assert len(stages) >= 2 and " AS builder" in stages[0]
    users = [args for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(args for name, args in instructions if name == "RUN")
    extras = set(re.findall(r"\.whl\)?\[([a-z,]+)\]", runs))
    assert extras == {"service"}, f"the runtime installs extras {extras}"


def test_healthcheck_uses_grpc_health_without_downloads() -> None:
    instructions = _instructions(DOCKERFILE.read_text())
    checks = [args for name, args in instructions if name == "HEALTHCHECK"]
    assert len(checks) == 1
    command = _words(checks[0].split("CMD", 1)[1].strip())
    assert command[0] == "mosaic-healthcheck"
    assert not {"curl", "wget"} & set(checks[0].split())
    copies = [args for name, args in instructions if name == "COPY"]
    assert any("deploy/healthcheck.py /usr/local/bin/mosaic-healthcheck" in c for c in copies)


def test_entrypoint_is_the_mosaic_command_and_cmd_parses() -> None:
    """ENTRYPOINT is the console script from pyproject; CMD must parse with the real `mosaic` parser.

    The import is deliberately not guarded: without the CLI this test fails rather than skips.
    """
    from mosaic_core.cli import build_parser

    instructions = _instructions(DOCKERFILE.read_text())
    entrypoint = [_words(args) for name, args in instructions if name == "ENTRYPOINT"]
    cmd = [_words(args) for name, args in instructions if name == "CMD"]
    assert entrypoint == [["mosaic"]]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "mosaic" in scripts
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    assert cmd[-1][0] in subcommands, f"CMD starts with {cmd[-1][0]!r}, not one of {sorted(subcommands)}"
    parser.parse_args(cmd[-1])  # exits (fails the test) on an unknown flag


def test_versions_agree_with_the_chart() -> None:
    """The Ray client in the router and the RayCluster must run the Ray version the image installs."""
    import yaml

    text = DOCKERFILE.read_text()
    ray_version = re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)
    chart = REPO_ROOT / "helm" / "mosaic"
    assert yaml.safe_load((chart / "values.yaml").read_text())["ray"]["rayVersion"] == ray_version
    app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
    assert app_version == tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture()
def health_server():
    """A real gRPC server on loopback with the standard health servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def _load_healthcheck():
    spec = importlib.util.spec_from_file_location("mosaic_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_healthcheck(*args: str) -> int:
    """The health check's exit code, run in-process (the script itself runs once as a subprocess, below)."""
    return _load_healthcheck().main(["--timeout-s", "5", *args])


def test_healthcheck_script_against_a_real_server(health_server) -> None:
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("mosaic.v1.Mosaic", health_pb2.HealthCheckResponse.NOT_SERVING)
    script = subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--port", str(port)], capture_output=True, text=True, timeout=60
    )
    assert script.returncode == 0 and script.stdout.strip() == "SERVING", script.stderr
    assert _run_healthcheck("--port", str(port), "--service", "mosaic.v1.Mosaic") == 1
    servicer.set("mosaic.v1.Mosaic", health_pb2.HealthCheckResponse.SERVING)
    assert _run_healthcheck("--port", str(port), "--service", "mosaic.v1.Mosaic") == 0
    assert _run_healthcheck("--port", str(port), "--service", "nope") == 1  # NOT_FOUND
    assert _run_healthcheck("--port", "1", "--timeout-s", "1") == 1  # nothing listening


def test_healthcheck_script_over_tls(tmp_path: Path) -> None:
    """The chart's exec probe path: TLS with a CA file and a server-name override (kubelet can't do TLS)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; it makes the throwaway certificate")
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=mosaic-router",
            "-addext",
            "subjectAltName=DNS:mosaic-router.mosaic.svc",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())]))
    server.start()
    try:
        tls = ["--port", str(port), "--tls-ca", str(cert), "--tls-server-name"]
        assert _run_healthcheck(*tls, "mosaic-router.mosaic.svc") == 0
        assert _run_healthcheck(*tls, "someone-else.example") == 1
        assert _run_healthcheck("--port", str(port)) == 1  # plaintext against a TLS port
    finally:
        server.stop(grace=None)
