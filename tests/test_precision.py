"""--backbone-precision auto and the per-machine int8 backbone: int8 only where this machine's own
cached measurement says it pays, the int8 backbone quantized once and reused, and a run trained on
it predicting and exporting with exactly that backbone."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

BACKBONE = "efficientnet_lite0"


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """An empty user cache holding only the converted fp32 backbone (copied from the real cache,
    so tests never re-convert it), for the int8 backbone and the tuning measurements."""
    import toolkit.features as features
    from toolkit.backbones import get_spec

    spec = get_spec(BACKBONE)
    features._openvino_backbone(spec, "fp32", None)  # make sure the real cache has it
    real = features.cache_dir() / "openvino"
    cache = tmp_path / "edgetune"
    (cache / "openvino").mkdir(parents=True)
    for f in real.glob(f"{spec.name}-w*"):
        if "int8" not in f.name:
            shutil.copy(f, cache / "openvino" / f.name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert features.cache_dir() == cache
    return cache


@pytest.fixture(scope="module")
def devices():
    from devices import detect_devices

    return detect_devices().devices


@pytest.fixture(scope="module")
def cpu_plan(devices):
    from devices import plan_training

    return plan_training("openvino:CPU", devices)


def _fake_speed(fp32: float, int8: float) -> None:
    """Store a speed measurement for the CPU as the real measurement would (these numbers stand
    in for a machine we do not have, e.g. an AVX-512 bf16 CPU on which fp32 keeps up with int8)."""
    from devices.openvino_tuning import precision_speed
    from toolkit.precision import speed_key

    precision_speed(speed_key("CPU", BACKBONE), lambda: {"fp32": lambda s: fp32, "int8": lambda s: int8}, rounds=1)


def _fake_int8_record(cosine: float) -> None:
    from toolkit import atomic
    from toolkit.backbones import get_spec
    from toolkit.features import int8_cache_path

    atomic.write_json(int8_cache_path(get_spec(BACKBONE)).with_suffix(".json"), {"feature_cosine": cosine})


@pytest.mark.parametrize("fp32, int8, cosine, expected", [
    (100.0, 175.0, 0.99, "int8"),  # AVX2 without VNNI, as measured here: int8 ~1.5-1.7x
    (100.0, 120.0, 0.99, "fp32"),  # fp32 computed in bf16 (AVX-512): int8 only 1.2x
    (100.0, 150.0, 0.99, "int8"),  # the bar itself counts
    (100.0, 175.0, 0.50, "fp32"),  # fast but its features do not follow fp32
])
def test_auto_follows_the_cached_measurement(user_cache, cpu_plan, monkeypatch, fp32, int8, cosine, expected):
    import toolkit.precision as precision

    _fake_speed(fp32, int8)
    _fake_int8_record(cosine)

    def no_measuring(*_a, **_k):
        raise AssertionError("a cached measurement must not be measured again")

    monkeypatch.setattr("devices.openvino_tuning.images_per_second", no_measuring)
    monkeypatch.setattr("toolkit.features.cached_int8_backbone", lambda spec, model=None: user_cache / "made")
    choice = precision.choose_backbone_precision("auto", BACKBONE, cpu_plan)
    assert choice.precision == expected, choice.reason
    assert choice.speedup == pytest.approx(int8 / fp32, abs=0.01)
    assert f"{int8 / fp32:.2f}x" in choice.reason


def test_explicit_precision_and_non_openvino_features_never_measure(user_cache, cpu_plan, devices):
    from devices import plan_training
    from toolkit.precision import choose_backbone_precision

    assert choose_backbone_precision("int8", BACKBONE, cpu_plan).precision == "int8"
    torch_plan = plan_training("cpu", devices)
    choice = choose_backbone_precision("auto", BACKBONE, torch_plan)
    assert choice.precision == "fp32" and "OpenVINO" in choice.reason
    assert choose_backbone_precision("auto", BACKBONE, cpu_plan, unfreeze=True).precision == "fp32"
    assert not (user_cache / "engine_tuning.json").exists()


def test_speed_is_measured_once_per_machine(user_cache):
    from devices.openvino_tuning import precision_speed

    made = []

    def timers():
        made.append(1)
        return {"fp32": lambda s: 50.0, "int8": lambda s: 90.0}

    first = precision_speed("CPU | tiny", timers, rounds=2, seconds=0.01)
    again = precision_speed("CPU | tiny", timers, rounds=2, seconds=0.01)
    assert made == [1] and again == first and first.speedup() == pytest.approx(1.8)


def test_int8_backbone_is_quantized_once_and_reused(user_cache, monkeypatch):
    import devices.openvino_tuning as tuning
    import toolkit.features as features
    from toolkit.backbones import get_spec

    monkeypatch.setattr(tuning, "BATCHES", (2,))  # the later run's engine tuning: one candidate
    monkeypatch.setattr(features, "CALIBRATION_VIEWS", 8)
    monkeypatch.setattr(features, "FIDELITY_PROBES", 8)
    calls = []
    real = features.nncf_int8

    def counting(model, batches, **kw):
        calls.append(len(batches))
        return real(model, batches, **kw)

    monkeypatch.setattr(features, "nncf_int8", counting)
    spec = get_spec(BACKBONE)
    paths = []
    # Two runs starting together: one quantizes, the other waits for it and reuses the result.
    threads = [threading.Thread(target=lambda: paths.append(features.cached_int8_backbone(spec))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [8] and len(set(paths)) == 1 and paths[0].is_file() and paths[0].with_suffix(".bin").is_file()
    record = features.int8_backbone_record(spec)
    assert 0 < record["feature_cosine"] <= 1 and record["calibration"] == "8 generated views"
    # Recipe v4: every convolution but the depthwise and the leading ones reads int8 activations; the
    # depthwise weights are int8.
    import openvino as ov

    from tests.conftest import int8_layout

    fed, depthwise_int8, leading_float = int8_layout(ov.Core().read_model(str(paths[0])))
    assert "Convolution" in fed and "GroupConvolution" not in fed and depthwise_int8 and leading_float
    engine = features.create_engine(BACKBONE, "openvino", "CPU", precision="int8")  # a later run
    assert calls == [8] and engine.precision == "int8"
    size = spec.input_size
    feats = engine.extract(np.full((2, size, size, 3), 128, np.uint8))
    assert feats.shape == (2, spec.feature_dim) and np.isfinite(feats).all()


def test_calibration_views_are_fixed_and_photo_sized():
    from toolkit.features import calibration_views

    a, b = calibration_views(224, 3), calibration_views(224, 3)
    assert all(x.shape == (224, 224, 3) and x.dtype == np.uint8 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # the same ranges on every machine
    assert not np.array_equal(a[0], a[1]) and a[0].std() > 10


def test_auto_run_trains_on_the_cached_int8_backbone_and_ships_it(user_cache, tiny_dataset, tmp_path, monkeypatch):
    """Two default runs on a machine measured to gain >= 1.5x: NNCF runs once, both runs train
    on int8, record why, keep that exact backbone, and predict/export with it."""
    import json

    import devices.openvino_tuning as tuning
    import toolkit.features as features
    from exporters import export
    from toolkit.learners import INT8_BACKBONE
    from toolkit.runtime import load_predictor
    from toolkit.train import TrainConfig, train

    monkeypatch.setattr(tuning, "BATCHES", (2,))
    monkeypatch.setattr(features, "CALIBRATION_VIEWS", 8)
    monkeypatch.setattr(features, "FIDELITY_PROBES", 8)
    monkeypatch.setattr("toolkit.precision.FIDELITY_BAR", 0.0)  # 8 calibration views: any fidelity
    calls = []
    real = features.nncf_int8
    monkeypatch.setattr(features, "nncf_int8", lambda m, b, **kw: calls.append(1) or real(m, b, **kw))
    _fake_speed(100.0, 175.0)
    config = dict(backbone=BACKBONE, views=1, workers=2, head="logreg", backbone_precision="auto")
    first = train(tiny_dataset, tmp_path / "a", TrainConfig(**config))
    second = train(tiny_dataset, tmp_path / "b", TrainConfig(**config))
    assert len(calls) == 1, "the second run must reuse the machine's int8 backbone"
    for out, metrics in ((tmp_path / "a", first), (tmp_path / "b", second)):
        recorded = json.loads((out / "config.json").read_text())
        assert recorded["train"]["backbone_precision"] == "int8"
        assert recorded["backbone_precision"]["requested"] == "auto" and "1.75x" in recorded["backbone_precision"]["reason"]
        assert metrics["backbone_precision"]["precision"] == "int8" and "int8" in metrics["feature_engine"]
    cached = features.int8_cache_path(features.get_spec(BACKBONE)).with_suffix(".bin").read_bytes()
    assert (tmp_path / "a" / INT8_BACKBONE).with_suffix(".bin").read_bytes() == cached
    assert "int8" in load_predictor(tmp_path / "a", device="openvino:CPU").describe()
    result = export(tmp_path / "a", "openvino-int8", tmp_path / "ov8")
    assert "own int8 backbone" in result.manifest["quantizer"]
    assert result.parity["agreement"] >= 0.99  # the same backbone as the run, the head in fp32
