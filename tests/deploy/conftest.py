"""Fixtures of the deployment tests: the chart checker, rendered value sets and the exported metric names."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
METRIC_TOKEN = re.compile(r"\bmosaic_[a-zA-Z0-9_]+")


def _load_check_chart() -> ModuleType:
    path = REPO_ROOT / "scripts" / "check_chart.py"
    spec = importlib.util.spec_from_file_location("check_chart", path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def check_chart() -> ModuleType:
    return _load_check_chart()


@pytest.fixture(scope="session")
def rendered(check_chart: ModuleType) -> dict[str, list[dict[str, Any]]]:
    """Manifests of every CI value set, rendered once per session."""
    return {name: check_chart.render_manifests(values) for name, values in check_chart.VALUE_SETS.items()}


@pytest.fixture(scope="session")
def exported_metrics() -> dict[str, set[str]]:
    """Metric family -> the series names it exposes, scraped from the real services.metrics registry.

    Counters expose ``<name>_total``, histograms ``_bucket``/``_sum``/``_count``. The ``_created`` series that
    prometheus_client adds for counters and histograms (parsed as gauge families of their own) are
    bookkeeping of the client library, not metrics to chart, and are left out.
    """
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.metrics import MosaicMetrics

    metrics = MosaicMetrics()
    metrics.prime()
    families = list(text_string_to_metric_families(generate_latest(metrics.registry).decode()))
    with_created = {f.name for f in families if f.type in ("counter", "histogram")}
    exported: dict[str, set[str]] = {}
    for family in families:
        if family.name.endswith("_created") and family.name.removesuffix("_created") in with_created:
            continue
        names = {s.name for s in family.samples if not s.name.endswith("_created")}
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
        exported[family.name] = names
    assert exported, "services.metrics exported no metric families"
    return exported


def _metric_names_in(expr: str) -> set[str]:
    return set(METRIC_TOKEN.findall(expr))


@pytest.fixture(scope="session")
def metric_names_in():
    """mosaic_* series names referenced by a PromQL expression (recording rules, with ':', do not match)."""
    return _metric_names_in
