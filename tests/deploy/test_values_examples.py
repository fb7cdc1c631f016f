"""The example values files in deploy/examples/ pass the chart's schema, render, lint and validate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("values-*.yaml"))


def test_the_documented_examples_exist():
    names = {path.name for path in EXAMPLES}
    assert {"values-single-gpu.yaml", "values-multi-gpu.yaml", "values-external-redis.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_values_render_and_validate(check_chart, path):
    values = yaml.safe_load(path.read_text())
    manifests = check_chart.render_manifests(values)  # runs values.schema.json first
    assert manifests
    assert check_chart.validate(manifests) == []
    assert check_chart.lint(values) == []
