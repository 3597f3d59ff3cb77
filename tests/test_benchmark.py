"""`edgetune benchmark`: latency on one batch-1 request compiled for latency, throughput, sane JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import cli


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_benchmark_bundle_json(fmt, exported):
    result = CliRunner().invoke(cli, ["benchmark", str(exported(fmt).out_dir), "--json", "--runs", "20",
                                      "--seconds", "0.3"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.output)
    assert 0 < m["latency_ms_p50"] <= m["latency_ms_p90"] <= m["latency_ms_p99"]
    assert m["runs"] == 20 and m["throughput_img_s"] > 0 and m["throughput_requests"] >= 1
    assert "1 request, batch 1" in m["description"]
    assert m["size_bytes"] == sum((exported(fmt).out_dir / f).stat().st_size for f in exported(fmt).files
                                  if f.startswith("model."))


def test_benchmark_run_dir(trained_run):
    result = CliRunner().invoke(cli, ["benchmark", str(trained_run), "--runs", "5", "--seconds", "0.1"])
    assert result.exit_code == 0, result.output
    assert "p99" in result.output and "img/s" in result.output


def test_openvino_latency_uses_a_batch1_latency_compile(exported, monkeypatch):
    """The compile the latency figure comes from: LATENCY hint, input fixed to batch 1 (robot code's call)."""
    import devices.openvino_compile as oc
    from toolkit.benchmark import openvino_latency

    seen = {}
    real = oc.compile_model

    def spy(model, device, **kw):
        seen["shape"] = [str(p.get_partial_shape()) for p in model.inputs]
        seen["latency"] = kw.get("latency")
        return real(model, device, **kw)

    monkeypatch.setattr(oc, "compile_model", spy)
    bundle = exported("openvino")
    times = openvino_latency(bundle.out_dir / "model.xml", bundle.manifest["input"]["size"], runs=3)
    assert len(times) == 3 and np.all(np.array(times) > 0)
    assert seen["latency"] is True and seen["shape"][0].startswith("[1,")


def test_benchmark_missing_model(tmp_path):
    result = CliRunner().invoke(cli, ["benchmark", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output
