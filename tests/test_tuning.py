"""Engine settings are measured once per machine and model, cached, and survive a damaged cache."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "edgetune" / "engine_tuning.json"


def _tiny_compile(calls):
    import openvino as ov
    from openvino import opset13 as ops

    from devices.openvino_compile import compile_model

    def compile_for(hint: str):
        calls.append(hint)
        x = ops.parameter([-1, 3, 8, 8], np.float32)
        return compile_model(ov.Model([ops.relu(x)], [x], "tiny"), "openvino:CPU", latency=hint == "LATENCY")

    return compile_for


def _batch(n: int) -> np.ndarray:
    return np.ones((n, 3, 8, 8), np.float32)


def test_measured_once_then_cached(cache):
    from devices.openvino_tuning import BATCHES, HINTS, tuned_settings

    calls: list[str] = []
    first = tuned_settings("tiny-model", _tiny_compile(calls), _batch, seconds=0.02)
    assert first.hint in HINTS and first.batch in BATCHES and first.images_per_second > 0
    assert sorted(calls) == sorted(HINTS)
    again = tuned_settings("tiny-model", _tiny_compile(calls), _batch, seconds=0.02)
    assert again == first and len(calls) == len(HINTS), "the second run must not measure again"
    table = json.loads(cache.read_text())
    assert len(table) == 1 and next(iter(table)).endswith("| tiny-model")
    other = tuned_settings("another-model", _tiny_compile(calls), _batch, seconds=0.02)
    assert len(calls) == 2 * len(HINTS) and len(json.loads(cache.read_text())) == 2
    assert other.batch in BATCHES


def test_damaged_cache_is_measured_again(cache):
    from devices.openvino_tuning import tuned_settings

    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    calls: list[str] = []
    settings = tuned_settings("tiny-model", _tiny_compile(calls), _batch, seconds=0.02)
    assert calls and json.loads(cache.read_text())  # rewritten whole
    assert settings.batch >= 1


def test_engine_uses_tuned_batch(cache, monkeypatch):
    """The feature pipeline feeds the engine the batch size the tuning chose."""
    import devices.openvino_tuning as tuning
    from toolkit.backbones import get_spec
    from toolkit.features import OpenVINOEngine, extract_features

    monkeypatch.setattr(tuning, "BATCHES", (3,))
    engine = OpenVINOEngine(get_spec("efficientnet_lite0"), "CPU")
    assert engine.batch == 3 and engine.tuning.batch == 3
    size = engine.spec.input_size
    seen = []
    real = engine.extract_many

    def spy(batches, out):
        def record():
            for offset, b in batches:
                seen.append(len(b))
                yield offset, b
        real(record(), out)

    engine.extract_many = spy
    feats = extract_features(engine, lambda k: np.full((size, size, 3), k * 20, np.uint8), 7)
    assert seen == [3, 3, 1] and feats.shape == (7, engine.spec.feature_dim)
