"""Domain adaptation: feature alignment folded into the head, AdaBN, and `edgetune adapt`'s bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from toolkit.adapt import DEFAULT_METHOD, METHODS, align_head, channel_stats, coral_map
from toolkit.head_fit import HeadParams, fit_head, head_logits


def _shifted_features(seed=0, n=100, dim=20):
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1, 2], n)
    centres = rng.uniform(0, 2, (3, dim))
    source = centres[y] + rng.normal(0, 0.4, (3 * n, dim))
    # The new camera: channels scaled and offset (a colour cast / low light on the features).
    scale, offset = rng.uniform(0.3, 1.0, dim), rng.uniform(1.5, 3.0, dim)
    return y, source, source * scale + offset


def _accuracy(params, x, y):
    return (head_logits(params, x.astype(np.float32)).argmax(1) == y).mean()


@pytest.mark.parametrize("step", ["mean", "diag", "coral"])
@pytest.mark.parametrize("head", ["logreg", "mlp", "prior"])
def test_folded_head_equals_aligning_the_features_then_the_head(step, head):
    from toolkit.head_fit import Prior

    y, source, target = _shifted_features()
    # The prior head's frozen classifier reads the same features: alignment must reach it too.
    prior = Prior(np.random.default_rng(3).normal(0, 0.5, (7, source.shape[1])).astype(np.float32),
                  np.zeros(7, np.float32))
    p = fit_head(head, source.astype(np.float32), y, 3, seed=0, prior=prior)
    (mu_s, sd_s), (mu_t, sd_t) = channel_stats(source), channel_stats(target)
    if step == "mean":
        aligned = target - mu_t + mu_s
    elif step == "diag":
        aligned = (target - mu_t) * (sd_s / sd_t) + mu_s
        np.testing.assert_allclose(aligned.mean(0), source.mean(0), atol=1e-9)
        np.testing.assert_allclose(aligned.std(0), source.std(0), rtol=1e-9)
    else:
        a, mu_t, mu_s = coral_map(source, target)
        aligned = (target - mu_t) @ a.T + mu_s
    folded = HeadParams(p.kind, align_head(p.tensors, step, source, target), "adapted")
    np.testing.assert_allclose(head_logits(folded, target.astype(np.float32)),
                               head_logits(p, aligned.astype(np.float32)), rtol=1e-3, atol=1e-3)
    # The export layout is kept: same tensor names and shapes.
    assert {k: v.shape for k, v in folded.tensors.items()} == {k: v.shape for k, v in p.tensors.items()}


@pytest.mark.parametrize("step", ["diag", "coral"])
def test_alignment_undoes_a_per_channel_feature_shift(step):
    y, source, target = _shifted_features()
    p = fit_head("logreg", source.astype(np.float32), y, 3)
    folded = HeadParams(p.kind, align_head(p.tensors, step, source, target), "adapted")
    assert _accuracy(folded, target, y) > _accuracy(p, target, y) + 0.1
    assert _accuracy(folded, target, y) > 0.9


@pytest.mark.parametrize("step", ["mean", "diag", "coral"])
def test_unshifted_target_leaves_the_head_as_it_was(step):
    y, source, _ = _shifted_features(seed=1)
    p = fit_head("logreg", source.astype(np.float32), y, 3)
    folded = HeadParams(p.kind, align_head(p.tensors, step, source, source), "adapted")
    np.testing.assert_allclose(head_logits(folded, source.astype(np.float32)),
                               head_logits(p, source.astype(np.float32)), atol=1e-3)


def test_diag_alignment_bounds_a_silent_channel():
    """A channel (nearly) constant on the target must not be scaled into fp16 overflow."""
    y, source, target = _shifted_features(seed=2)
    target[:, 0] = 1.0
    p = fit_head("logreg", source.astype(np.float32), y, 3)
    inv = align_head(p.tensors, "diag", source, target)["feature_inv_std"]
    assert np.isfinite(inv).all() and inv[0] <= 10.0 * p.tensors["feature_inv_std"][0] * (1 + 1e-6)


def _layer_stats(rng, images, shift=0.0):
    from toolkit.adapt import _Moments

    # Per image a content-dependent offset (what the image shows) plus pixel noise; `shift`
    # moves every pixel, as a camera change does.
    x = rng.normal(0, 1, (images, 8, 1, 1)) + rng.normal(0, 0.5, (images, 8, 6, 6)) + shift
    m = _Moments()
    for half in (x[: images // 2], x[images // 2:]):  # in batches, as bn_statistics reads them
        m.add(_Moments.of(torch.from_numpy(half)))
    return m.stats()


def test_adabn_moves_statistics_by_a_real_shift_not_by_the_noise_of_another_sample():
    """Two samples of the same camera differ by chance; AdaBN must not move BatchNorm by that
    difference (3.8 val points on 50 classes), but must still follow a real camera change."""
    from toolkit.adapt import _moved

    rng = np.random.default_rng(0)
    source = _layer_stats(rng, 64)
    base = (torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
    same = _layer_stats(rng, 64)
    assert float((same[0] - source[0]).abs().max()) > 0.1  # the two samples do differ by chance
    mean, var = _moved(base, source, same, 1)
    assert torch.equal(mean, base[0]) and torch.allclose(var, base[1])  # ... and nothing moves
    shifted = _layer_stats(rng, 64, shift=2.0)
    mean, _ = _moved(base, source, shifted, 1)
    np.testing.assert_allclose(mean.numpy(), (shifted[0] - source[0]).numpy(), rtol=0.1)  # a real shift: moved in full


def test_cli_offers_every_method_with_the_measured_default():
    from toolkit.cli import cli

    option = next(p for p in cli.commands["adapt"].params if p.name == "method")
    assert tuple(option.type.choices) == METHODS and option.default == DEFAULT_METHOD


@pytest.fixture(scope="module")
def small_run(tiny_dataset, tmp_path_factory):
    from toolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("adapt") / "run"
    train(tiny_dataset, out, TrainConfig(backbone="efficientnet_lite0", views=1, head="logreg"))
    return out


@pytest.mark.parametrize("method", [DEFAULT_METHOD, "adabn+diag"])
def test_adapt_writes_a_new_run_that_predicts(method, small_run, tiny_dataset, tmp_path):
    from toolkit.cli import cli
    from toolkit.evaluate import evaluate
    from toolkit.runs import RunDir
    from toolkit.runtime import load_predictor

    before = (small_run / "model.safetensors").read_bytes()
    out = tmp_path / "adapted"
    result = CliRunner().invoke(cli, ["adapt", str(small_run), str(tiny_dataset / "train"), "--out", str(out),
                                      "--method", method])
    assert result.exit_code == 0, result.output
    assert (small_run / "model.safetensors").read_bytes() == before, "the source run is never modified"
    adapted = RunDir.open(out)
    assert adapted.config["adapted"]["method"] == method
    assert any(k.startswith("backbone.") for k in adapted.model_state()) == method.startswith("adabn")
    assert evaluate(load_predictor(out), tiny_dataset / "val")["accuracy"] >= 0.9
    if method.startswith("camera"):
        # The target is the run's own training images: no camera is fitted, the head stays as it was.
        assert adapted.config["adapted"]["camera"]["fitted"] == "unchanged"
        for k, v in RunDir.open(small_run).head_tensors().items():
            np.testing.assert_array_equal(v, adapted.head_tensors()[k])
    if method.startswith("adabn"):
        # The target is the run's own training images: no layer differs beyond chance, none moves.
        record = adapted.config["adapted"]
        assert record["batchnorm_layers"] > 20 and record["batchnorm_layers_moved"] == 0
        assert "BatchNorm layers moved 0 of" in result.output
        # The re-estimated BatchNorm ships as backbone.* tensors: export keeps parity.
        from exporters import export

        result = export(out, "onnx", tmp_path / "onnx")
        assert result.parity["max_abs_diff"] < 1e-3


def test_adapt_camera_fits_a_blurrier_darker_camera_and_refits_the_head(small_run, tiny_dataset, tmp_path):
    """--method camera: the target is the training scenes through a softer lens and a darker
    exposure; adapt fits a camera that blurs and darkens, undoes the tone at the input, refits the
    head on the training images rendered with the blur, and says so.
    (Adapting to the run's own images: test_adapt_writes_a_new_run_that_predicts.)"""
    import cv2

    from toolkit.cli import cli
    from toolkit.runs import RunDir

    dark = tmp_path / "dark"
    dark.mkdir()
    for f in sorted((tiny_dataset / "train").rglob("*.*")):
        img = cv2.GaussianBlur(cv2.imread(str(f)), (0, 0), 2.0)
        cv2.imwrite(str(dark / f"{f.parent.name}_{f.stem}.png"), np.clip((img / 255.0) ** 1.6 * 0.5 * 255, 0, 255).astype(np.uint8))
    result = CliRunner().invoke(cli, ["adapt", str(small_run), str(dark), "--out", str(tmp_path / "a"), "--method", "camera"])
    assert result.exit_code == 0, result.output
    fitted = RunDir.open(tmp_path / "a").config["adapted"]["camera"]
    assert fitted["settings"]["level"] < 0.8 and fitted["distance"] < 0.5 * fitted["identity_distance"], fitted
    assert fitted["settings"]["blur"] > 0 and fitted["head_refitted"], fitted
    assert f"camera: {fitted['fitted']}" in " ".join(result.output.split())
    head = RunDir.open(small_run).head_tensors()
    assert not np.array_equal(RunDir.open(tmp_path / "a").head_tensors()["layers.1.weight"], head["layers.1.weight"])


def test_adapt_camera_aligns_a_prior_head_instead_of_refitting_it(tiny_dataset, tmp_path):
    """A prior head (class means) cannot learn a new camera from renderings: --method camera aligns it
    by diag where it would refit, says so, and the adapted run keeps the prior head's layout."""
    import cv2

    from toolkit.cli import cli
    from toolkit.runs import RunDir
    from toolkit.train import TrainConfig, train

    run = tmp_path / "run"
    train(tiny_dataset, run, TrainConfig(backbone="efficientnet_lite0", views=1, head="prior"))
    blurred = tmp_path / "blurred"
    blurred.mkdir()
    for f in sorted((tiny_dataset / "train").rglob("*.*")):
        cv2.imwrite(str(blurred / f"{f.parent.name}_{f.stem}.png"), cv2.GaussianBlur(cv2.imread(str(f)), (0, 0), 3.0))
    result = CliRunner().invoke(cli, ["adapt", str(run), str(blurred), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    adapted = RunDir.open(tmp_path / "a")
    camera = adapted.config["adapted"]["camera"]
    assert camera["settings"]["blur"] > 0 and not camera["head_refitted"], camera
    assert camera["aligned_instead_of_refit"] == "diag" and "diag alignment" in " ".join(result.output.split())
    before, after = RunDir.open(run).head_tensors(), adapted.head_tensors()
    assert set(after) == set(before) and not np.array_equal(after["feature_inv_std"], before["feature_inv_std"])
    np.testing.assert_array_equal(after["prior_out.weight"], before["prior_out.weight"])  # aligned, not refitted


def test_adapt_camera_undoes_a_darker_tone_at_the_input_of_every_model(small_run, tiny_dataset, tmp_path):
    """A change of tone curve alone is undone on the new camera's frames, not learnt (the run's head
    is kept as it is): the adapted run's preprocessing gains the camera correction table, its
    Predictor applies it, and an export carries it in manifest.json for the bundle's Predictor (and
    a C++ node) to apply."""
    import cv2

    from exporters import export
    from toolkit.cli import cli
    from toolkit.runs import RunDir
    from toolkit.runtime import load_predictor

    dark, files = tmp_path / "dark", sorted((tiny_dataset / "train").rglob("*.*"))
    dark.mkdir()
    for f in files:
        img = cv2.imread(str(f))
        cv2.imwrite(str(dark / f"{f.parent.name}_{f.stem}.png"), np.clip((img / 255.0) ** 1.6 * 0.5 * 255, 0, 255).astype(np.uint8))
    out = tmp_path / "a"
    result = CliRunner().invoke(cli, ["adapt", str(small_run), str(dark), "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = RunDir.open(out).config
    assert cfg["adapted"]["camera"]["corrects_tone"], cfg["adapted"]["camera"]
    assert cfg["preprocessing"]["camera_correction"] == cfg["camera_correction"]
    camera = cfg["adapted"]["camera"]
    assert camera["learnt_by_head"] == "unchanged" and not camera["head_refitted"]  # the table undid it all
    for k, v in RunDir.open(small_run).head_tensors().items():
        np.testing.assert_array_equal(RunDir.open(out).head_tensors()[k], v)
    frame = dark / f"{files[0].parent.name}_{files[0].stem}.png"
    original = load_predictor(small_run).preprocess(files[0]).astype(float)
    assert np.abs(load_predictor(small_run).preprocess(frame) - original).mean() > 40
    assert np.abs(load_predictor(out).preprocess(frame) - original).mean() < 12  # the grid's step, not the shift
    result = export(out, "onnx", tmp_path / "onnx")
    bundle = result.out_dir
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["camera_correction"] == cfg["camera_correction"]
    np.testing.assert_array_equal(load_predictor(bundle).preprocess(frame), load_predictor(out).preprocess(frame))
    # The export's val figures are those `evaluate RUN` gives: the val images through the correction too.
    from toolkit.evaluate import evaluate

    assert result.parity["source_accuracy"] == pytest.approx(evaluate(load_predictor(out), tiny_dataset)["accuracy"])
    from exporters.base import val_set
    from toolkit.runtime import to_nchw_float

    views, _ = val_set(RunDir.open(out))
    val_files = sorted((tiny_dataset / "val").rglob("*.*"), key=lambda p: (p.parent.name != "red", p.parent.name, p.name))
    first = to_nchw_float(load_predictor(out).preprocess(val_files[0])[None])
    assert any(np.array_equal(first[0], v) for v in views)  # the corrected view, not the raw one
    # An adapted run is complete: resuming it would retrain its head without the adaptation.
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(out)])
    assert resumed.exit_code == 2 and "nothing to resume" in resumed.output


@pytest.mark.parametrize("case", ["empty", "no_run", "missing_int8", "thumbnails", "adabn_on_int8", "no_source",
                                  "camera_no_source", "corrected"])
def test_adapt_bad_input_is_one_line_and_writes_nothing(case, small_run, tiny_dataset, tmp_path):
    import cv2

    from toolkit.cli import cli

    run, target, method = small_run, tmp_path / "target", DEFAULT_METHOD
    target.mkdir()
    if case != "empty":
        for i in range(10):
            side = 32 if case == "thumbnails" else 160
            cv2.imwrite(str(target / f"{i}.png"), np.full((side, side, 3), 20 * i, np.uint8))
    if case == "no_run":
        run = tmp_path / "nothing"
    if case in ("missing_int8", "adabn_on_int8", "no_source", "camera_no_source", "corrected"):
        run = tmp_path / "copy"
        shutil.copytree(small_run, run)
        cfg = json.loads((run / "config.json").read_text())
        if case == "corrected":  # adapted before, with a camera correction: its frames are not the training camera's
            from toolkit.camera import Camera
            from toolkit.preprocess import correction_record

            cfg["camera_correction"] = correction_record(Camera(level=0.5).correction_lut(), "level 0.5")
            (run / "config.json").write_text(json.dumps(cfg))
        if case in ("missing_int8", "adabn_on_int8"):
            cfg["train"]["backbone_precision"] = "int8"
            (run / "config.json").write_text(json.dumps(cfg))
        if case == "adabn_on_int8":
            (run / "backbone-int8.xml").write_text("<net/>")
        if case.endswith("no_source"):  # adabn and camera read the training images: they moved away
            split = json.loads((run / "split.json").read_text())
            for f in split["train"]:
                f["path"] = str(tmp_path / "gone" / Path(f["path"]).name)
            (run / "split.json").write_text(json.dumps(split))
        method = {"adabn_on_int8": "adabn", "no_source": "adabn", "camera_no_source": "camera"}.get(case, method)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["adapt", str(run), str(target), "--out", str(out), "--method", method])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_openvino_int8_quantizes_the_adapted_backbone_not_the_pretrained_one(small_run, tiny_dataset, tmp_path):
    """openvino-int8 starts from the cached pretrained backbone IR when a run has no backbone
    weights of its own; an AdaBN-adapted run (or an --unfreeze one) has them, and its graph must be
    its own classifier, or the export would ship without the adaptation."""
    import cv2
    import openvino as ov
    import torch

    from exporters.base import ExportContext
    from exporters.openvino_ir import cached_classifier, with_head
    from toolkit.cli import cli
    from toolkit.features import _openvino_backbone
    from toolkit.runs import RunDir

    dark = tmp_path / "dark"
    dark.mkdir()
    for i, path in enumerate(sorted((tiny_dataset / "train").rglob("*.*"))):  # a darker camera
        cv2.imwrite(str(dark / f"{i}.png"), (cv2.imread(str(path)) * 0.35).astype(np.uint8))
    out = tmp_path / "adapted"
    result = CliRunner().invoke(cli, ["adapt", str(small_run), str(dark), "--out", str(out), "--method", "adabn"])
    assert result.exit_code == 0, result.output
    adapted = RunDir.open(out)
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, adapted.spec.input_size, adapted.spec.input_size))
    x = x.astype(np.float32)

    def run_graph(model):
        return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]

    with torch.no_grad():
        expected = adapted.build_classifier()(torch.from_numpy(x)).numpy()
    ctx = ExportContext(adapted)
    pretrained = run_graph(with_head(_openvino_backbone(adapted.spec, "fp32", None), adapted, ctx))
    assert np.abs(pretrained - expected).max() > 1e-2, "the dark camera must move the BatchNorm statistics"
    np.testing.assert_allclose(run_graph(cached_classifier(adapted, ctx)), expected, atol=1e-3)
