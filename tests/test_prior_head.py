"""The "prior" head: feature prototypes plus prototypes of the backbone's own ImageNet posteriors.

Synthetic features check the fitting, the few-shot rule and that every graph the head becomes
(numpy, torch, ONNX, OpenVINO, int8-compressed weights) computes the same logits; one tiny real
run checks train -> export -> learn end to end.
"""

import warnings

import numpy as np
import pytest

from toolkit.head_fit import HEADS, Prior, cross_validate, fit_head, head_logits


def ambiguous(n_per_class=8, d=200, k=12, seed=0, sigma=1.0, shift=1.5):
    """Features whose class shows only along the direction a known classifier reads (prior classes
    0 and 1; the others never fire): in 200 noisy dimensions, 8 images a class locate that direction
    poorly, the classifier knows it. The classifier and the class centre are fixed; `seed` draws images."""
    rng = np.random.default_rng(100)
    w = rng.normal(0, 1, (k, d)).astype(np.float32)
    bias = np.full(k, -1e4, np.float32)
    bias[:2] = 0
    u = (w[0] - w[1]) / np.linalg.norm(w[0] - w[1])
    centre = rng.uniform(2, 3, d)
    centre -= (centre @ u) * u
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    x = centre + rng.normal(0, sigma, (len(y), d)) + np.where(y[:, None] == 0, shift, -shift) * u
    return x.astype(np.float32), y, Prior(w, bias)


def test_prior_head_uses_the_posteriors_where_the_features_alone_are_ambiguous():
    x, y, prior = ambiguous()
    x_test, y_test, _ = ambiguous(n_per_class=100, seed=1000)
    protos = fit_head("prototypes", x, y, 2)
    heavy = fit_head("prior", x, y, 2, prior=prior, weight=1.0)
    assert heavy.kind == "prior" and heavy.options == {"weight": 1.0}
    acc = lambda p: float((head_logits(p, x_test).argmax(1) == y_test).mean())  # noqa: E731
    assert acc(heavy) > acc(protos) + 0.1
    # The feature part is the prototypes head itself: with the prior's weight near 0 they agree.
    light = fit_head("prior", x, y, 2, prior=prior, weight=1e-6)
    np.testing.assert_array_equal(head_logits(light, x_test).argmax(1), head_logits(protos, x_test).argmax(1))


def test_prior_head_cv_scores_its_weight_path_and_needs_a_prior():
    x, y, prior = ambiguous(n_per_class=10)
    cv = cross_validate(["prototypes", "prior"], x, y, 2, folds=5, prior=prior)
    weights = [c.options["weight"] for c in cv.candidates if c.name == "prior"]
    assert weights == [0.1, 0.25, 0.5, 1.0]
    with pytest.raises(Exception, match="needs the backbone's pretrained"):
        fit_head("prior", x, y, 2)
    from toolkit.selection import select_head

    # auto leaves the prior head out where there is no prior, and keeps it where there is
    assert all(c.name != "prior" for c in select_head("auto", x, y, 2, folds=3).cv.candidates)
    assert any(c.name == "prior" for c in select_head("auto", x, y, 2, folds=3, prior=prior).cv.candidates)


def test_few_shot_rule_is_the_prior_head_with_a_prior_and_imprint_without():
    from toolkit.selection import prior_rule_weight, select_head

    x, y, prior = ambiguous(n_per_class=1)
    sel = select_head("auto", x, y, 2, prior=prior)
    assert sel.cv is None and sel.params.name == "prior" and sel.params.options == {"weight": 0.25}
    assert "picks prior" in sel.reason
    assert select_head("auto", x, y, 2).params.name == "imprint"
    # The prior is trusted less as the class means it corrects come from more images.
    x, y, prior = ambiguous(n_per_class=5)
    assert select_head("auto", x, y, 2, prior=prior).params.options == {"weight": 0.1}
    assert [prior_rule_weight(k) for k in (1, 2, 4, 5)] == [0.25, 0.25, 0.125, 0.1]


def _prior_params():
    x, y, prior = ambiguous(n_per_class=6)
    params = fit_head("prior", x, y, 2, prior=prior, weight=0.5)
    # A run's head is standardised (logreg-style); make that non-trivial so the branch must read it.
    params.tensors["feature_mean"] = np.full(x.shape[1], 0.3, np.float32)
    params.tensors["feature_inv_std"] = np.full(x.shape[1], 1.2, np.float32)
    return params, x


def test_every_form_of_the_prior_head_computes_the_same_logits():
    import torch

    from toolkit.heads import create_head

    params, x = _prior_params()
    ref = head_logits(params, x)
    t = params.tensors  # the documented layout, written out
    xs = (x - t["feature_mean"]) * t["feature_inv_std"]
    z = xs @ t["prior.weight"].T + t["prior.bias"]
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(xs @ t["layers.1.weight"].T + t["layers.1.bias"] + p @ t["prior_out.weight"].T, ref,
                               rtol=1e-4, atol=1e-4)
    head = create_head("prior", x.shape[1], 2, prior_classes=len(params.tensors["prior.bias"]))
    head.load_state_dict({k: torch.from_numpy(v) for k, v in params.tensors.items()})
    with torch.no_grad():
        got = head.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    trainable = {n for n, _ in head.named_parameters()}
    assert trainable == {"layers.1.weight", "layers.1.bias", "prior_out.weight"}  # the classifier stays frozen


def _onnx_head(params, d):
    import onnx
    from onnx import TensorProto, helper

    from toolkit.bundle_model import _attach_onnx_head

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["features"])], "head",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, d])])
    g.node.extend(_attach_onnx_head(g, "features", params.tensors, params.kind))
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_prior_head_graphs_match_and_compress_the_classifier_to_int8_and_the_logits_layers_to_fp16():
    import onnxruntime as ort
    import openvino as ov
    import openvino.opset13 as ops
    from onnx import numpy_helper

    from exporters.head_weights import compress_onnx_head, compress_openvino_head
    from toolkit.bundle_model import openvino_classifier

    params, x = _prior_params()
    ref = head_logits(params, x)
    model = _onnx_head(params, x.shape[1])

    def run_onnx(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]

    np.testing.assert_allclose(run_onnx(model), ref, rtol=1e-4, atol=1e-4)
    assert compress_onnx_head(model) == 3
    stored = {i.name: numpy_helper.to_array(i).dtype for i in model.graph.initializer}
    assert stored["edgetune.head.prior.weight_int8"] == np.int8
    assert stored["edgetune.head.layers.1.weight_fp16"] == np.float16
    assert stored["edgetune.head.prior_out.weight_fp16"] == np.float16
    np.testing.assert_allclose(run_onnx(model), ref, atol=0.02 * np.abs(ref).max())

    param = ops.parameter([-1, x.shape[1]], ov.Type.f32)
    ov_model = openvino_classifier(ov.Model([ops.result(param)], [param]), param.output(0), params.tensors, "prior")
    exact = {"INFERENCE_PRECISION_HINT": "f32"}
    np.testing.assert_allclose(ov.Core().compile_model(ov_model, "CPU", exact)(x)[0], ref, rtol=1e-4, atol=1e-4)
    assert compress_openvino_head(ov_model) == 3
    kinds = {c.get_element_type() for c in ov_model.get_ops() if c.get_type_name() == "Constant" and c.get_byte_size() > 64}
    assert ov.Type.i8 in kinds and ov.Type.f16 in kinds
    np.testing.assert_allclose(ov.Core().compile_model(ov_model, "CPU", exact)(x)[0], ref, atol=0.02 * np.abs(ref).max())


def test_prior_head_is_registered_and_torch_free():
    assert HEADS["prior"].needs_prior and HEADS["prior"].kind == "prior"


@pytest.mark.integration
def test_a_prior_run_exports_and_learns_a_new_class(tiny_dataset, tmp_path, make_image_folder):
    """train --head prior on a real backbone, export (ONNX: parity-checked; openvino-int8), and
    `learn` a new class on the ONNX bundle, which refits the prior head from its feature memory."""
    from exporters import export
    from toolkit.learn import learn
    from toolkit.runs import RunDir
    from toolkit.train import TrainConfig, train

    run = tmp_path / "run"
    metrics = train(tiny_dataset, run, TrainConfig(backbone="efficientnet_lite0", views=1, head="prior"))
    cfg = RunDir.open(run).config
    assert cfg["train"]["head"] == "prior" and cfg["head_selection"]["selected"] == "prior"
    assert metrics["val_accuracy"] >= 0.75
    assert RunDir.open(run).head_tensors()["prior.weight"].shape == (1000, 1280)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_bundle = export(run, "onnx", tmp_path / "onnx")
        int8 = export(run, "openvino-int8", tmp_path / "int8", max_drop=100.0)
    assert onnx_bundle.parity["max_abs_diff"] < 1e-3
    assert int8.out_dir.is_dir()
    new = make_image_folder(tmp_path / "new", ("yellow",), 6)
    result = learn(onnx_bundle.out_dir, new, tmp_path / "learned")
    assert result.head == "prior" and "yellow" in result.labels
    assert result.verification["agreement"] == 1.0
