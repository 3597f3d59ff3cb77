"""Temperature scaling, the unknown threshold and open-set figures (torch-free, synthetic logits)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.calibration import (Calibration, auroc, fit_calibration, fit_temperature, nll, open_set_report,
                                 unknown_threshold)
from toolkit.errors import EdgetuneError
from toolkit.evaluate import expected_calibration_error


def _overconfident(n=2000, c=4, scale=4.0, seed=0):
    """Logits whose true temperature is `scale`: labels drawn from softmax(z / scale)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, c)) * scale
    p = np.exp(z / scale - (z / scale).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return z, labels


def test_temperature_recovers_the_true_scale_and_lowers_ece():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert 3.3 < t < 4.8
    assert nll(z, y, t) < nll(z, y, 1.0)
    cal = Calibration(t)
    assert expected_calibration_error(cal.probabilities(z), y) < 0.03 < expected_calibration_error(
        Calibration().probabilities(z), y)


def test_undetermined_temperature_is_reported():
    # Separable held-out logits (a tiny, easy run): the likelihood improves all the way to the bound.
    y = np.arange(40) % 2
    z = np.where(np.eye(2)[y] > 0, 3.0, -3.0) + np.random.default_rng(0).normal(0, 0.1, (40, 2))
    cal = fit_calibration(z, y)
    assert cal.temperature < 0.5 and "undetermined" in cal.source
    z, y = _overconfident(500)
    assert "undetermined" not in fit_calibration(z, y).source


def test_unknown_threshold_keeps_the_stated_share():
    conf = np.linspace(0.3, 1.0, 200)
    th = unknown_threshold(conf, 0.95)
    assert (conf >= th).mean() == pytest.approx(0.95, abs=0.006)
    assert unknown_threshold(conf, 1.0) == 0.0
    with pytest.raises(EdgetuneError):
        unknown_threshold(conf, 0.0)
    z, y = _overconfident(500)
    cal = fit_calibration(z, y, keep=0.9)
    accepted = (cal.probabilities(z).max(1) >= cal.unknown_threshold).mean()
    assert 0.9 <= accepted <= 0.91 and cal.keep == 0.9


def test_manifest_round_trip_and_override():
    cal = Calibration(2.0, 0.6, 0.95, "out-of-fold logits")
    back = Calibration.from_manifest({"calibration": cal.to_json()})
    assert back == cal and Calibration.from_manifest({}) == Calibration()
    assert back.with_threshold(0.3).unknown_threshold == 0.3
    assert back.is_unknown(0.59) and not back.is_unknown(0.6)


def test_auroc_and_false_accepts():
    assert auroc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert auroc(np.array([0.5, 0.5]), np.array([0.5])) == 0.5
    r = open_set_report(np.array([0.9, 0.95, 0.4]), np.array([0.3, 0.7]), 0.5)
    assert r["false_accept_rate"] == 0.5 and r["known_accept_rate"] == pytest.approx(0.6667, abs=1e-4)
