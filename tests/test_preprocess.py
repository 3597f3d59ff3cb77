"""One preprocessing everywhere: every path an image can take to a model gives the same bytes.

A 50-file corpus of mixed formats (tests/image_corpus.py) goes through model_input (file and
in-memory BGR/RGB frames), the Predictor, training's decode + clean view, evaluate, predict,
export calibration and the export parity (val) set, and an independent re-implementation of
manifest.json's description (what a C++ node would write). All must be bit-identical.
"""

from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.image_corpus import motion_photo, photo, write_corpus
from toolkit.data import Dataset, Sample, decode_images, list_images
from toolkit.images import ImageReadError, _exif_orientation, apply_orientation, read_image
from toolkit.preprocess import describe, eval_resize_shorter, eval_view, model_input
from toolkit.runtime import Predictor

SIZE = 224


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("corpus") / "data"
    return root, write_corpus(root)


def _follow_manifest(path: Path, size: int) -> np.ndarray:
    """The model input built only from describe(size), the way a C++ node would (OpenCV calls)."""
    desc = describe(size)
    data = path.read_bytes()
    buf = np.frombuffer(data, np.uint8)
    if data[:3] == b"\xff\xd8\xff":
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    else:
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        img = apply_orientation(img, _exif_orientation(data))
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        img = np.dstack([img] * 3)
    elif img.shape[2] == 2:
        img = np.dstack([img[:, :, 0]] * 3 + [img[:, :, 1]])
    if img.shape[2] == 4:
        bg = desc["alpha"]["background"][0]
        a = img[:, :, 3:4].astype(np.int64)
        img = ((img[:, :, :3].astype(np.int64) * a + bg * (255 - a) + 127) // 255).astype(np.uint8)
    img = img[:, :, ::-1]  # colour order RGB
    h, w = img.shape[:2]
    s, target = min(h, w), desc["resize"]["shorter_side"]
    new = [target if n == s else (n * target * 2 + s) // (2 * s) for n in (h, w)]
    if s != target:
        flag = desc["resize"]["interpolation_down" if s > target else "interpolation_up"]
        img = cv2.resize(np.ascontiguousarray(img), (new[1], new[0]), interpolation=getattr(cv2, flag))
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return img[top : top + size, left : left + size]


class _Capture(Predictor):
    """A Predictor whose 'model' records the views it is given."""

    def __init__(self, size: int = SIZE) -> None:
        self.views: list[np.ndarray] = []
        super().__init__(["a", "b"], size, self._record, "capture")

    def _record(self, views: np.ndarray) -> np.ndarray:
        self.views.extend(np.array(v) for v in views)
        return np.zeros((len(views), 2), np.float32)


class _FakeRun:
    def __init__(self, root: Path, size: int) -> None:
        self.config = {"data": str(root), "train": {"val_fraction": 0.2, "seed": 0}}
        self.path = root / "run"  # no split.json there: the val split as found
        self.labels = ["a", "b"]
        self.spec = type("Spec", (), {"input_size": size})()


def test_corpus_is_the_promised_mix(corpus):
    _, paths = corpus
    names = {p.name for p in paths}
    assert len(paths) == 50
    assert {"exif_6.jpg", "exif_6.png", "alpha_0.png", "grey16.png", "one_pixel.png", "motion_photo.jpg"} <= names
    shapes = {p.name: read_image(p).shape for p in paths}  # every file decodes
    assert shapes["exif_6.jpg"][:2] == (640, 400) and shapes["exif_6.png"][:2] == (500, 300)  # turned upright
    assert shapes["large_1.jpg"][:2] == (3000, 2250)  # full resolution, never a reduced decode
    # The corpus has teeth: a reduced-resolution decode gives other model inputs for big JPEGs.
    big = next(p for p in paths if p.name == "large_0.jpg")
    reduced = cv2.imdecode(np.fromfile(big, np.uint8), cv2.IMREAD_REDUCED_COLOR_4)[:, :, ::-1]
    assert not np.array_equal(model_input(reduced, SIZE, rgb=True), model_input(big, SIZE))


def test_every_path_gives_bit_identical_model_inputs(corpus, monkeypatch):
    from exporters.base import calibration_set, val_set
    from toolkit import runtime
    from toolkit.evaluate import evaluate
    from toolkit.predict import predict_paths

    root, paths = corpus
    expected = {p: model_input(p, SIZE) for p in paths}
    got: dict[str, dict[Path, np.ndarray]] = {}

    got["manifest recipe"] = {p: _follow_manifest(p, SIZE) for p in paths}
    rgb = {p: read_image(p) for p in paths}
    got["BGR frame"] = {p: model_input(np.ascontiguousarray(rgb[p][:, :, ::-1]), SIZE) for p in paths}
    got["RGB frame"] = {p: model_input(rgb[p], SIZE, rgb=True) for p in paths}
    capture = _Capture()
    got["Predictor.preprocess(path)"] = {p: capture.preprocess(p) for p in paths}
    got["Predictor.preprocess(rgb)"] = {p: capture.preprocess(rgb[p]) for p in paths}

    ds = Dataset([Sample(p, 0) for p in paths], ["a", "b"], root)
    images, kept, skipped = decode_images(ds, min_side=eval_resize_shorter(SIZE))
    assert not skipped
    got["training decode + clean view"] = {s.path: eval_view(im, SIZE) for s, im in zip(kept.samples, images)}

    evaluate(capture, ds)
    got["evaluate"] = dict(zip([s.path for s in kept.samples], capture.views))

    predicting = _Capture()
    monkeypatch.setattr(runtime, "load_predictor", lambda *a, **k: predicting)
    results = predict_paths(Path("unused"), paths, batch_size=7)
    assert not any("error" in r for r in results)
    got["predict"] = dict(zip(paths, predicting.views))

    run = _FakeRun(root, SIZE)
    to_u8 = lambda x: np.round(x).astype(np.uint8).transpose(0, 2, 3, 1)  # noqa: E731
    got["export calibration (--calib)"] = dict(zip(list_images(root), to_u8(calibration_set(run, root, 1000))))
    train_files = sorted(p for p in paths if "train" in p.parts)
    val_files = [s.path for s in sorted((Sample(p, 0 if p.parent.name == "a" else 1) for p in paths
                                         if "val" in p.parts), key=lambda s: (s.label, str(s.path)))]
    got["export calibration (train split)"] = dict(zip(sorted(train_files, key=lambda p: (p.parent.name, str(p))),
                                                       to_u8(calibration_set(run, None, 1000))))
    views, _ = val_set(run)
    got["export parity (val split)"] = dict(zip(val_files, to_u8(views)))

    for where, views_by_path in got.items():
        assert set(views_by_path) <= set(expected), where
        assert len(views_by_path) >= 25, where
        for p, view in views_by_path.items():
            assert view.shape == (SIZE, SIZE, 3) and view.dtype == np.uint8, (where, p.name)
            assert np.array_equal(view, expected[p]), f"{where}: {p.name} differs (max {np.abs(view.astype(int) - expected[p]).max()})"
    assert len(got["predict"]) == len(got["evaluate"]) == 50


def test_description_is_in_every_bundle_manifest_shape():
    desc = describe(240)
    assert desc["resize"]["shorter_side"] == 274 and desc["crop"]["width"] == 240
    assert desc["resize"]["interpolation_down"] == "INTER_AREA" and desc["resize"]["interpolation_up"] == "INTER_LINEAR"
    assert desc["alpha"]["background"] == [255, 255, 255] and desc["color"] == "RGB"
    assert "no IMREAD_REDUCED" in desc["decode"]["library"]


def test_long_side_rounds_half_up_in_integers():
    # 548 x W -> shorter side 274 (halved): 731 / 2 = 365.5 -> 366 and 729 / 2 = 364.5 -> 365, where
    # Python's round() would give 364 (banker's rounding is not what a C++ node does).
    for w, want in ((731, 366), (729, 365)):
        img = photo(548, w, 0)
        resized = model_input(img, 240)
        assert resized.shape == (240, 240, 3)
        from toolkit.preprocess import resize_shorter

        assert resize_shorter(img, 274).shape[:2] == (274, want)


def test_frames_accept_opencv_shapes():
    bgr = photo(60, 80, 1)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    assert np.array_equal(model_input(grey, 32), model_input(np.dstack([grey] * 3), 32))
    assert np.array_equal(model_input(grey[:, :, None], 32), model_input(grey, 32))
    opaque = np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)])
    assert np.array_equal(model_input(opaque, 32), model_input(bgr, 32))
    clear = np.dstack([bgr, np.zeros(bgr.shape[:2], np.uint8)])
    assert (model_input(clear, 32) == 255).all()  # fully transparent -> white
    assert np.array_equal(model_input(bgr.astype(np.uint16) * 257, 32), model_input(bgr, 32))
    # 8-bit values in a wider integer type (np.array of a list) are those values, not near-black.
    for dtype in (np.int64, np.int32, np.int16):
        assert np.array_equal(model_input(bgr.astype(dtype), 32), model_input(bgr, 32))
    with pytest.raises(ValueError):
        model_input(np.zeros((4, 4, 5), np.uint8), 32)


# ------------------------------------------------------------------------ motion photos, truncation


@pytest.mark.parametrize("seed", range(20))
def test_motion_photos_decode(tmp_path, seed):
    img = photo(240, 320, seed)
    path = tmp_path / "PXL_motion.jpg"
    # A few hundred kB of video after the JPEG: the old "last FFD9 after last FFDA" rule rejected 10 of these 20.
    path.write_bytes(motion_photo(img, seed, trailer=300_000 + 997 * seed))
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    assert np.array_equal(read_image(path), read_image(plain))


def test_real_truncation_is_still_reported(tmp_path):
    data = cv2.imencode(".jpg", photo(240, 320, 3))[1].tobytes()
    for cut in (len(data) // 3, len(data) - 400, len(data) - 2):
        path = tmp_path / f"cut{cut}.jpg"
        path.write_bytes(data[:cut])
        with pytest.raises(ImageReadError, match="truncated JPEG"):
            read_image(path)
    progressive = cv2.imencode(".jpg", photo(240, 320, 4), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    (tmp_path / "prog.jpg").write_bytes(progressive + b"trailer")
    assert read_image(tmp_path / "prog.jpg").shape == (240, 320, 3)
    (tmp_path / "prog_cut.jpg").write_bytes(progressive[: len(progressive) // 2])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(tmp_path / "prog_cut.jpg")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_exif_orientation_matches_opencv_jpeg_rule(tmp_path, orientation):
    from tests.image_corpus import png_with_exif

    data = png_with_exif(photo(30, 50, orientation), orientation)
    (tmp_path / "o.png").write_bytes(data)
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV's own rule
    assert np.array_equal(read_image(tmp_path / "o.png"), upright[:, :, ::-1])


# ------------------------------------------------------------------------------- thread safety


def test_openvino_runner_is_safe_from_many_threads(tmp_path):
    ov = pytest.importorskip("openvino")
    import openvino.opset13 as ops

    from toolkit.runtime import openvino_runner

    x = ops.parameter([-1, 3, 32, 32], ov.Type.f32, name="image")
    w = np.random.default_rng(0).normal(size=(3 * 32 * 32, 64)).astype(np.float32)
    flat = ops.reshape(x, ops.constant(np.array([-1, 3 * 32 * 32], np.int64)), False)
    model = ov.Model([ops.matmul(flat, ops.constant(w), False, False)], [x], "probe")
    ov.save_model(model, str(tmp_path / "m.xml"))
    run = openvino_runner(tmp_path / "m.xml", latency=True)
    inputs = [np.random.default_rng(i).random((4, 3, 32, 32), dtype=np.float32) for i in range(8)]
    want = [run(x) for x in inputs]
    errors: list[str] = []

    def worker(k: int) -> None:
        for step in range(60):
            i = (k + step) % len(inputs)
            if not np.array_equal(run(inputs[i]), want[i]):
                errors.append(f"thread {k} step {step}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


def test_backbone_cache_key_includes_the_weights_version(monkeypatch):
    from toolkit import features
    from toolkit.backbones import get_spec

    spec = get_spec("efficientnet_lite0")
    from importlib.metadata import version

    assert features.weights_version(spec) == version(spec.weights)
    before = features.backbone_cache_key(spec, "ov-x")
    monkeypatch.setattr(features, "weights_version", lambda s: "9.9.9")
    assert features.backbone_cache_key(spec, "ov-x") != before and "9.9.9" in features.backbone_cache_key(spec, "ov-x")


def test_run_dir_and_bundle_predictors_give_identical_results_to_concurrent_callers(trained_run, exported):
    from concurrent.futures import ThreadPoolExecutor

    from toolkit.runtime import load_predictor

    rng = np.random.default_rng(0)
    for model in (trained_run, exported("openvino").out_dir):
        predictor = load_predictor(model)
        size = predictor.input_size
        batches = [rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8) for _ in range(6)]
        want = [predictor.predict(b) for b in batches]
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(lambda i: predictor.predict(batches[i % 6]), range(24)))
        for i, probs in enumerate(got):
            np.testing.assert_allclose(probs, want[i % 6], rtol=0, atol=1e-6, err_msg=f"{model} call {i}")


def test_bundle_manifest_states_the_preprocessing(exported):
    from toolkit.runtime import read_manifest

    bundle = exported("onnx").out_dir
    pre = read_manifest(bundle)["preprocessing"]
    size = read_manifest(bundle)["input"]["size"]
    assert {k: v for k, v in pre.items() if k in describe(size)} == describe(size)
    assert pre["normalization"]["inside_model"] is True
