"""Feature engines agree with the eager torch backbone, and the view pipeline is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.features import create_engine, extract_features

BACKBONE = "efficientnet_lite0"


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def reference(batch):
    return create_engine(BACKBONE, "torch", "cpu").extract(batch)


@pytest.mark.parametrize("runtime,device", [("openvino", "CPU"), ("onnxruntime", "CPUExecutionProvider")])
def test_engines_match_torch(runtime, device, batch, reference):
    engine = create_engine(BACKBONE, runtime, device)
    out = engine.extract(batch)
    assert out.shape == reference.shape == (5, 1280)
    if engine.compute == "bf16":  # CPUs with bf16 units: OpenVINO trades 3 digits for ~2x speed
        assert _cosine(out, reference).min() > 0.99
    else:
        np.testing.assert_allclose(out, reference, atol=2e-3, rtol=1e-3)


def _cosine(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_int8_engine_stays_close(batch, reference):
    calib = list(batch) * 4
    out = create_engine(BACKBONE, "openvino", "CPU", precision="int8", calibration=calib).extract(batch)
    assert _cosine(out, reference).min() > 0.9


def test_extract_features_is_ordered_and_deterministic(batch):
    engine = create_engine(BACKBONE, "openvino", "CPU")
    views = [batch[k % len(batch)] for k in range(37)]  # not a multiple of the batch size
    a = extract_features(engine, lambda k: views[k], 37, batch_size=8)
    b = extract_features(engine, lambda k: views[k], 37, batch_size=16, workers=1)
    assert a.dtype == np.float16 and a.shape == (37, 1280)
    np.testing.assert_array_equal(a[0], a[5])  # same image, same features
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2)
