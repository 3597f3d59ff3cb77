"""End to end on real photos (../shared/datasets/hymenoptera) and the embedded demo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from toolkit.cli import cli
from toolkit.train import TrainConfig, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ants_run(hymenoptera, tmp_path_factory):
    out = tmp_path_factory.mktemp("integration") / "ants"
    return out, train(hymenoptera, out, TrainConfig())


def test_default_training_on_ants_and_bees(ants_run):
    _, metrics = ants_run
    assert metrics["n_train"] == 245 and metrics["n_val"] == 153
    assert metrics["val_accuracy"] >= 0.93, metrics


def test_evaluate_reproduces_training_accuracy(ants_run, hymenoptera):
    out, metrics = ants_run
    result = CliRunner().invoke(cli, ["evaluate", str(out), str(hymenoptera / "val"), "--json"])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)
    assert evaluated["n"] == 153
    # Same eval view and weights; only the engine's compute precision may differ (bf16 vs fp32).
    assert abs(evaluated["accuracy"] - metrics["val_accuracy"]) <= 2 / 153


def test_demo_runs_without_user_data(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--per-class", "12"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["classes"]) >= 4
    assert metrics["val_accuracy"] >= 0.8
