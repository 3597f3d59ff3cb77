"""Exporter contract tests: every registered format, plus bad input and ORT on-device training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters import EXPORTERS, export, get_exporter, list_formats
from exporters.bundle import read_embedded
from toolkit.errors import EdgetuneError
from toolkit.runs import RunDir

# What each format must produce. A registered exporter missing here fails test_every_format_has_a_contract.
CONTRACTS = {
    "onnx": {"files": ["model.onnx"], "model": "model.onnx"},
    "onnx-int8": {"files": ["model.onnx"], "model": "model.onnx"},
    "openvino": {"files": ["model.xml", "model.bin"], "model": "model.xml"},
    "openvino-int8": {"files": ["model.xml", "model.bin"], "model": "model.xml"},
    "ort-training": {"files": ["training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint",
                               "inference.onnx"], "model": "inference.onnx"},
}
FORMATS = list_formats()


def _has_ort_training() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401
    except ImportError:
        return False
    return True


# Upstream publishes onnxruntime-training for CPython <= 3.12 on x86_64 only; elsewhere the
# exporter must refuse with a clear message (tested below), and its contract cannot be checked.
needs_ort_training = pytest.mark.skipif(not _has_ort_training(), reason="onnxruntime-training not installed here")


def test_every_format_has_a_contract():
    assert sorted(CONTRACTS) == FORMATS, "add a CONTRACTS entry for each registered exporter"


def test_exporters_have_the_same_shape():
    for name, cls in EXPORTERS.items():
        assert cls.name == name
        assert cls.runtime in ("onnxruntime", "openvino")
        assert cls.tolerance is None or cls.tolerance > 0
        assert cls.precision in ("fp32", "fp16", "int8")


@pytest.mark.parametrize("fmt", [pytest.param(f, marks=needs_ort_training) if f == "ort-training" else f
                                 for f in FORMATS])
class TestExporterContract:
    def test_outputs_logits_and_probabilities(self, fmt, exported):
        result = exported(fmt)
        if result.model.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(result.model), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            x = np.random.default_rng(0).uniform(0, 255, (2, 3, *[result.manifest["input"]["size"]] * 2))
            logits, probs = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})
        else:
            import openvino as ov

            model = ov.Core().read_model(str(result.model))
            names = [o.get_any_name() for o in model.outputs]
            size = result.manifest["input"]["size"]
            x = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
            logits, probs = ov.Core().compile_model(model, "CPU")(x).values()
        assert names == ["logits", "probabilities"]
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-3)
        assert (probs.argmax(1) == logits.argmax(1)).all()

    def test_files_and_manifest(self, fmt, exported):
        result = exported(fmt)
        for name in CONTRACTS[fmt]["files"] + ["manifest.json"]:
            assert (result.out_dir / name).is_file(), name
        assert not [p for p in result.out_dir.parent.iterdir() if p.name.startswith(".")], "staging left behind"
        manifest = json.loads((result.out_dir / "manifest.json").read_text())
        assert manifest["format"] == fmt and manifest["model"] == CONTRACTS[fmt]["model"]
        assert manifest["labels"] == ["ants", "bees"]
        spec = RunDir(result.manifest["source_run"]).spec
        assert manifest["input"] == {"name": "image", "size": spec.input_size, "layout": "NCHW", "dtype": "float32",
                                     "range": "0-255", "color": "RGB", "batch": None}
        assert manifest["preprocessing"]["center_crop"] == spec.input_size
        assert manifest["backbone"]["name"] == spec.name
        assert "val_accuracy" in manifest["training_metrics"]
        assert manifest["edgetune_version"]
        assert manifest["export_parity"]["n"] == 8

    def test_parity_within_tolerance(self, fmt, exported):
        cls = get_exporter(fmt)
        parity = exported(fmt).parity
        if cls.tolerance is not None:
            scale = max(1.0, parity["logit_scale"]) if cls.relative_tolerance else 1.0
            assert parity["max_abs_diff"] <= cls.tolerance * scale
            assert parity["agreement"] >= cls.min_agreement
        else:  # int8: the accuracy drop is gated by --max-drop (tested in benchmarks on real val sets);
            # a 3-epoch head has near-tied logits, so only check the numbers are measured and sane.
            assert 0.0 <= parity["agreement"] <= 1.0 and np.isfinite(parity["max_abs_diff"])
            assert parity["tolerance"] is None

    def test_metadata_embedded_in_model(self, fmt, exported):
        result = exported(fmt)
        embedded = read_embedded(result.out_dir / CONTRACTS[fmt]["model"])
        assert embedded["format"] == fmt
        assert json.loads(embedded["labels"]) == ["ants", "bees"]
        assert json.loads(embedded["export_parity"])["n"] == 8
        assert "normalization" in json.loads(embedded["preprocessing"])

    def test_loads_with_its_runtime_and_evaluates(self, fmt, exported, trained_run):
        from toolkit.evaluate import evaluate
        from toolkit.runtime import load_predictor

        result = exported(fmt)
        predictor = load_predictor(result.out_dir)
        size = RunDir(trained_run).spec.input_size
        assert predictor.labels == ["ants", "bees"] and predictor.input_size == size
        metrics = evaluate(predictor, Path(json.loads((trained_run / "config.json").read_text())["data"]) / "val")
        assert metrics["n"] == 8 and metrics["images_skipped"] == 0
        assert abs(metrics["accuracy"] - result.parity["export_accuracy"]) < 1e-6
        probs = predictor.predict(np.zeros((2, size, size, 3), np.uint8))
        assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)


# -- bad input -------------------------------------------------------------------------------


def _nothing_left(parent: Path) -> bool:
    return not parent.exists() or not any(parent.iterdir())


def test_unknown_format_suggests_the_closest():
    with pytest.raises(EdgetuneError, match=r"Unknown format 'onxx'\. Did you mean 'onnx'\? Available: onnx, onnx-int8"):
        get_exporter("onxx")


def test_unknown_format_via_cli_exits_2(trained_run):
    from click.testing import CliRunner

    from toolkit.cli import cli

    result = CliRunner().invoke(cli, ["export", str(trained_run), "--format", "openvino-int9"])
    assert result.exit_code == 2
    assert "Did you mean 'openvino-int8'" in result.output


def test_missing_run_dir(tmp_path):
    with pytest.raises(EdgetuneError, match="not an edgetune run"):
        export(tmp_path / "nope", "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_half_written_run_dir(tmp_path, trained_run):
    run = tmp_path / "half"
    run.mkdir()
    shutil.copy(trained_run / "config.json", run / "config.json")
    with pytest.raises(EdgetuneError, match="no model.safetensors"):
        export(run, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unreadable_calibration_images(tmp_path, trained_run):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(3):
        (calib / f"img{i}.jpg").write_text("not an image")
    out = tmp_path / "exports" / "int8"
    with pytest.raises(EdgetuneError, match="No readable calibration images"):
        export(trained_run, "onnx-int8", out, calibration=calib)
    assert _nothing_left(out.parent)


def test_unwritable_out_dir(tmp_path, trained_run):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(EdgetuneError, match="is a file"):
        export(trained_run, "onnx", blocker / "sub")
    assert blocker.read_text() == "x"


def test_export_never_replaces_a_folder_that_is_not_an_export(tmp_path, trained_run):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"a user's photo")
    with pytest.raises(EdgetuneError, match="not an edgetune export"):
        export(trained_run, "onnx", photos)
    assert [p.name for p in photos.iterdir()] == ["a.jpg"]
    for out in (trained_run, trained_run.parent):  # the run itself, or a folder holding it
        with pytest.raises(EdgetuneError, match="holds the run"):
            export(trained_run, "onnx", out)
    assert (trained_run / "model.safetensors").is_file()
    bundle = tmp_path / "bundle"  # an earlier export of its own is what --out may replace
    export(trained_run, "onnx", bundle)
    (bundle / "model.onnx").write_bytes(b"stale")
    export(trained_run, "onnx", bundle)
    assert (bundle / "model.onnx").read_bytes() != b"stale"


def test_int8_bundle_keeps_its_feature_memory_beside_an_unreadable_training_image(hymenoptera, tmp_path):
    # Calibration decodes every readable training image of a small run, so the feature memory had
    # only the unreadable one left to decode, and dropped the whole memory ("none could be read").
    from toolkit.train import TrainConfig, train

    from .conftest import copy_subset

    data = copy_subset(hymenoptera, tmp_path / "data", n_train=6, n_val=3)
    (data / "train" / "ants" / "broken.jpg").write_text("not an image")
    train(data, tmp_path / "run", TrainConfig(backbone="efficientnet_lite0", epochs=3, views=1))
    export(tmp_path / "run", "onnx-int8", tmp_path / "bundle", max_drop=100.0)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["feature_memory"]["counts"] == {"ants": 6, "bees": 6}


def test_failed_parity_leaves_nothing(tmp_path, trained_run, monkeypatch):
    from exporters.onnx_fp32 import OnnxExporter

    monkeypatch.setattr(OnnxExporter, "tolerance", 1e-12)
    out = tmp_path / "exports" / "onnx"
    with pytest.raises(EdgetuneError, match="Export failed parity"):
        export(trained_run, "onnx", out)
    assert _nothing_left(out.parent)


# -- ORT on-device training ------------------------------------------------------------------


@needs_ort_training
def test_ort_training_loss_falls_and_exports_inference(exported, trained_run, tmp_path):
    from onnxruntime.training import api

    from toolkit.augment import eval_view
    from toolkit.images import read_image
    from toolkit.runtime import onnx_runner, to_nchw_float

    bundle = exported("ort-training").out_dir
    work = tmp_path / "train"
    shutil.copytree(bundle, work)  # training updates the checkpoint: keep the session's bundle intact
    state = api.CheckpointState.load_checkpoint(str(work / "checkpoint"))
    module = api.Module(str(work / "training_model.onnx"), state, str(work / "eval_model.onnx"))
    optimizer = api.Optimizer(str(work / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(5e-3)
    size = RunDir(trained_run).spec.input_size
    data = Path(RunDir(trained_run).config["data"])
    # Swap the labels (a robot relearning its classes): the head must move, the loss must fall.
    views, targets = [], []
    for target, cls in ((1, "ants"), (0, "bees")):
        for f in sorted((data / "train" / cls).iterdir())[:6]:
            views.append(eval_view(read_image(f), size))
            targets.append(target)
    x, y = to_nchw_float(np.stack(views)), np.array(targets, np.int64)
    # A train step sees the features inference sees: BatchNorm is folded away, never run on batch
    # statistics (onnxruntime-training's training-mode kernel), so the first loss is the
    # cross-entropy of the bundle's own inference logits.
    import onnx

    assert not any("BatchNorm" in n.op_type for n in onnx.load(str(work / "training_model.onnx")).graph.node)
    before = onnx_runner(bundle / "inference.onnx")(x)
    z = before - before.max(1, keepdims=True)
    expected_loss = float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(1))).mean())
    module.train()
    losses = []
    for _ in range(8):
        loss = module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
        losses.append(float(loss))
    assert losses[0] == pytest.approx(expected_loss, rel=1e-3, abs=1e-4), (losses[0], expected_loss)
    assert losses[-1] < losses[0] * 0.8, losses
    module.eval()
    out = tmp_path / "trained_inference.onnx"
    module.export_model_for_inferencing(str(out), ["logits"])
    logits = onnx_runner(out)(x)
    assert logits.shape == (len(y), 2)
    assert (logits.argmax(1) == y).mean() > 0.5


def test_ort_training_unavailable_is_a_clear_error(monkeypatch):
    import builtins

    from exporters.ort_training import require_training_api

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("onnxruntime.training"):
            raise ImportError("No module named 'onnxruntime.training'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(EdgetuneError, match="onnxruntime-training is not available on this platform.*--format onnx"):
        require_training_api()


# -- int8 calibration ------------------------------------------------------------------------


def test_int8_calibration_sees_every_batch(tmp_path):
    """The activation ranges must cover all calibration images, not just the last few batches
    (ORT 1.19's CalibMaxIntermediateOutputs silently dropped the earlier ones)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_int8 import calibrate, quantize

    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 4, 4])], initializer=[w])
    fp32, out = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(fp32))
    calib = np.ones((37, 1, 4, 4), np.float32)  # 5 batches of 8 (the last padded)
    calib[5] = 100.0  # the largest activation is in the first batch only (padding reuses images 0-2)
    quantize(fp32, out, calibrate(fp32, calib, batch=8))
    scales = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer if "scale" in i.name}
    act = [float(v) for k, v in scales.items() if k.startswith(("c_", "y_")) and v.size == 1]
    assert act and all(abs(s * 255 - 100.0) < 1.0 for s in act), scales


def test_format_help_comes_from_the_registry():
    from click.testing import CliRunner

    from toolkit.cli import cli

    help_text = CliRunner().invoke(cli, ["export", "--help"]).output
    for fmt in FORMATS:
        assert f"{fmt}:" in help_text


@pytest.mark.parametrize("fmt, nncf_first", [("onnx-int8", False), ("onnx-int8", True), ("openvino-int8", None)])
def test_a_missed_budget_runs_accuracy_controlled_quantization(fmt, nncf_first, trained_run, tmp_path, monkeypatch):
    from exporters import onnx_int8, parity

    real, calls = parity.Budget.misses, []
    if nncf_first is not None:  # which recipe goes first depends on the CPU's int8 units: try both orders
        monkeypatch.setattr(onnx_int8, "nncf_first", lambda: nncf_first)

    def first_call_misses(self, measured):  # pretend the plain quantization missed, once
        calls.append(1)
        return ["pretend miss"] if len(calls) == 1 else real(self, measured)

    monkeypatch.setattr(parity.Budget, "misses", first_call_misses)
    result = export(trained_run, fmt, tmp_path / fmt, max_drop=100.0)
    assert result.manifest["precision"] == "int8"
    # onnx-int8 tries its other plain recipe before accuracy control: NNCF's (in ORT's fused layout)
    # after ORT's, or ORT's after NNCF's
    second = {False: onnx_int8.NNCF_QUANTIZER, True: onnx_int8.ORT_QUANTIZER,
              None: "nncf.quantize_with_accuracy_control"}
    assert result.manifest["quantizer"] == second[nncf_first]
    assert result.parity["budget"]["max_drop"] == 100.0


def test_onnx_int8_falls_back_to_accuracy_control_in_the_fused_layout(trained_run, tmp_path, monkeypatch):
    """Two misses: NNCF quantization, then accuracy control, whose graph onnxruntime must still fuse
    (as NNCF writes it, every convolution runs in float: 4x fp32's latency on a plain AVX2 CPU)."""
    from exporters import parity
    from tests.conftest import onnxruntime_ops

    real, calls = parity.Budget.misses, []

    def two_misses(self, measured):
        calls.append(1)
        return ["pretend miss"] if len(calls) <= 2 else real(self, measured)

    monkeypatch.setattr(parity.Budget, "misses", two_misses)
    result = export(trained_run, "onnx-int8", tmp_path / "b", max_drop=100.0)
    assert result.manifest["quantizer"] == "nncf.quantize_with_accuracy_control"
    ops = onnxruntime_ops(result.model, tmp_path)
    assert ops["QLinearConv"] > 0 and ops["QLinearConv"] >= 4 * ops.get("Conv", 0)
