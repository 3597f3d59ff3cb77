"""toolkit.runtime predictors and toolkit.evaluate on run dirs and bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import EdgetuneError
from toolkit.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]


def _val_views(run_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    from toolkit.augment import eval_view
    from toolkit.data import load_eval_set
    from toolkit.images import read_image

    ds = load_eval_set(Path(RunDir(run_dir).config["data"]) / "val", RunDir(run_dir).labels)
    return np.stack([eval_view(read_image(s.path), size) for s in ds.samples]), ds.labels()


def test_run_dir_predictor_matches_torch(trained_run):
    import torch

    from toolkit.runtime import load_predictor, to_nchw_float

    predictor = load_predictor(trained_run)
    views, _ = _val_views(trained_run, predictor.input_size)
    with torch.inference_mode():
        ref = RunDir(trained_run).build_classifier()(torch.from_numpy(to_nchw_float(views))).numpy()
    probs = predictor.predict(views)
    assert probs.shape == ref.shape
    assert (probs.argmax(1) == ref.argmax(1)).all()
    assert predictor.describe()


def test_a_run_dir_says_unknown_as_its_exports_do(trained_run, exported):
    # The run's calibration (temperature, unknown threshold) is in its config.json, as in a bundle's manifest.
    import toolkit

    run, bundle = toolkit.load(trained_run), toolkit.load(exported("onnx").out_dir)
    assert run.calibration == bundle.calibration and run.calibration.unknown_threshold > 0


def test_a_damaged_bundle_is_refused_before_use(exported, tmp_path):
    import shutil

    from toolkit.runtime import load_predictor

    bundle = tmp_path / "b"
    shutil.copytree(exported("openvino").out_dir, bundle)
    data = bytearray((bundle / "model.bin").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)  # damaged weights, the same size
    (bundle / "model.bin").write_bytes(bytes(data))
    with pytest.raises(EdgetuneError, match="does not match its manifest"):
        load_predictor(bundle)


def test_openvino_bundle_loads_without_a_writable_cache(exported, tmp_path, monkeypatch):
    # A robot's read-only home: the compiled-model cache only saves time, so compile without it.
    from toolkit.runtime import load_predictor

    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a_file" / "cache"))
    predictor = load_predictor(exported("openvino").out_dir)
    views = np.zeros((1, predictor.input_size, predictor.input_size, 3), np.uint8)
    assert predictor.predict(views).shape == (1, 2)


def test_evaluate_shape(trained_run):
    from toolkit.evaluate import evaluate
    from toolkit.runtime import load_predictor

    predictor = load_predictor(trained_run)
    m = evaluate(predictor, Path(RunDir(trained_run).config["data"]) / "val")
    assert set(m) >= {"accuracy", "n", "loss", "per_class", "confusion", "ece", "images_skipped"}
    assert m["n"] == 8 and len(m["confusion"]) == 2 and sum(map(sum, m["confusion"])) == 8
    assert set(m["per_class"]["ants"]) == {"precision", "recall", "f1", "support"}
    assert 0.0 <= m["ece"] <= 1.0 and m["loss"] > 0


def test_ece_perfectly_calibrated_is_zero():
    from toolkit.evaluate import expected_calibration_error

    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(probs, np.array([0, 1])) == 0.0


def test_not_a_model(tmp_path):
    from toolkit.runtime import load_predictor

    with pytest.raises(EdgetuneError, match="neither an edgetune run"):
        load_predictor(tmp_path)
    with pytest.raises(EdgetuneError, match="does not exist"):
        load_predictor(tmp_path / "nope")


_NO_TORCH = """
import sys, numpy as np
{block}
from toolkit.runtime import load_predictor
p = load_predictor(sys.argv[1])
probs = p.predict(np.zeros((2, p.input_size, p.input_size, 3), np.uint8))
assert probs.shape == (2, len(p.labels))
print(sys.modules.get("torch") is not None)
"""


@pytest.mark.parametrize("fmt", ["openvino", "onnx"])
def test_bundle_runtime_is_torch_free(fmt, exported):
    bundle = exported(fmt).out_dir
    # onnxruntime-training's own import-time check imports torch when it is installed (plain
    # onnxruntime on a robot does not): for ONNX bundles, prove edgetune never needs it by
    # making torch unimportable. OpenVINO bundles must not load torch at all.
    block = "sys.modules['torch'] = None" if fmt == "onnx" else ""
    out = subprocess.run([sys.executable, "-c", _NO_TORCH.format(block=block), str(bundle)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_static_bundle_pads_batches(trained_run, tmp_path):
    from exporters import export
    from toolkit.runtime import load_predictor

    result = export(trained_run, "onnx", tmp_path / "static", static=True)
    assert json.loads((result.out_dir / "manifest.json").read_text())["input"]["batch"] == 1
    p = load_predictor(result.out_dir)
    assert p.predict(np.zeros((3, p.input_size, p.input_size, 3), np.uint8)).shape == (3, 2)


@pytest.mark.parametrize("static", [None, 4])
def test_pipelined_infer_returns_every_row_in_order(static):
    """Bulk OpenVINO inference (export parity, feature memories) keeps several requests in flight:
    every row must come back once, in order, from each output, a static batch's padding dropped."""
    import openvino as ov
    from openvino import opset13 as ops

    from toolkit.runtime import PipelinedInfer, run_batched

    x = ops.parameter([static or -1, 3], ov.Type.f32, name="x")
    doubled, summed = ops.multiply(x, ops.constant(np.float32(2))), ops.reduce_sum(x, [1], keep_dims=True)
    compiled = ov.Core().compile_model(ov.Model([doubled, summed], [x], "two_outputs"), "CPU",
                                       {"PERFORMANCE_HINT": "THROUGHPUT"})
    # 5 batches of 4 or 3 of 8 on 2 requests: the last ones finish on the requests out of turn
    inputs = np.random.default_rng(0).normal(size=(19, 3)).astype(np.float32)
    run = PipelinedInfer(compiled, static_batch=static, chunk=8, outputs=compiled.outputs)
    out = run_batched(run, inputs, batch=static)
    np.testing.assert_allclose(out, np.concatenate([inputs * 2, inputs.sum(1, keepdims=True)], axis=1), rtol=1e-6)
