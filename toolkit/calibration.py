"""Calibrated confidence and "unknown", torch-free (numpy + scipy), shared by export, learn and classify.

- Temperature scaling: one scalar T minimising the negative log-likelihood of softmax(logits / T)
  on held-out logits. Held-out means out-of-fold cross-validation logits of the training set, never
  the val split (val is for reporting).
- Unknown threshold: the calibrated top-1 probability below which a frame is called "unknown",
  chosen so that `keep` (default 95%) of held-out known-class images are still accepted.
- AUROC and false-accept rate of known vs unknown images for `evaluate` (ECE: toolkit.evaluate).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

DEFAULT_KEEP = 0.95
_T_RANGE = (0.05, 20.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    unknown_threshold: float = 0.0  # 0: nothing is unknown (an uncalibrated bundle)
    keep: float | None = None  # share of held-out known images the threshold accepts
    source: str = "none"  # where the held-out logits came from

    def is_unknown(self, confidence: float) -> bool:
        return confidence < self.unknown_threshold

    def with_threshold(self, threshold: float) -> "Calibration":
        if not 0.0 <= threshold <= 1.0:
            from toolkit.errors import EdgetuneError

            raise EdgetuneError(f"--unknown-threshold {threshold} must be a probability between 0 and 1.")
        return replace(self, unknown_threshold=float(threshold), keep=None, source=f"{self.source}; threshold set by user")

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return _softmax(np.asarray(logits, np.float64) / self.temperature).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        return {"temperature": round(self.temperature, 6), "unknown_threshold": round(self.unknown_threshold, 6),
                "keep": self.keep, "source": self.source}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any] | None) -> "Calibration":
        c = (manifest or {}).get("calibration") or {}
        return cls(float(c.get("temperature", 1.0)), float(c.get("unknown_threshold", 0.0)), c.get("keep"),
                   c.get("source", "none"))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising NLL of softmax(logits / T) (bounded scalar search on log T: NLL is smooth there)."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, int)
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                          bounds=tuple(np.log(_T_RANGE)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def unknown_threshold(confidences: np.ndarray, keep: float = DEFAULT_KEEP) -> float:
    """The largest threshold that still accepts `keep` of these (held-out, known-class) confidences."""
    if not 0.0 < keep <= 1.0:
        from toolkit.errors import EdgetuneError

        raise EdgetuneError(f"keep={keep}: the share of known images to accept must be in (0, 1].")
    conf = np.sort(np.asarray(confidences, np.float64))
    if not len(conf):
        return 0.0
    # Accept conf >= threshold: reject at most floor((1-keep)*n) of the lowest.
    rejected = int(np.floor((1.0 - keep) * len(conf) + 1e-9))
    return float(conf[rejected]) if rejected else 0.0


def fit_calibration(heldout_logits: np.ndarray, labels: np.ndarray, *, keep: float = DEFAULT_KEEP,
                    source: str = "out-of-fold logits") -> Calibration:
    """Temperature, then the unknown threshold on the temperature-scaled held-out confidences."""
    t = fit_temperature(heldout_logits, labels)
    bound = _T_RANGE[0] if t < 1.0 else _T_RANGE[1]
    if nll(heldout_logits, labels, bound) <= nll(heldout_logits, labels, t) + 1e-9:
        # Every held-out image right with room to spare (a small, easy set): the likelihood only
        # improves towards the bound, so the data do not pin T down. Say so wherever it is read
        # (the source string goes into manifest.json); at INFO, as nothing is wrong with the run.
        import logging

        logging.getLogger(__name__).info("The calibration temperature is undetermined (%.3g, as good as its "
                                            "bound %g): %d held-out images are all separated; confidences are "
                                            "near 0/1.", t, bound, len(labels))
        source += f"; temperature undetermined ({t:.3g}, as good as its bound {bound:g}): held-out logits all separated"
    conf = _softmax(np.asarray(heldout_logits, np.float64) / t).max(axis=1)
    # The threshold is a probability: store it a hair below the kept confidence so fp32 runtimes
    # reproduce the same accept decision on the very image that set it.
    return Calibration(t, max(0.0, unknown_threshold(conf, keep) - 1e-6), keep, source)


def auroc(known_scores: np.ndarray, unknown_scores: np.ndarray) -> float:
    """P(a known image scores higher than an unknown one): the Mann-Whitney form of the ROC area."""
    from scipy.stats import rankdata

    k, u = np.asarray(known_scores, np.float64), np.asarray(unknown_scores, np.float64)
    if not len(k) or not len(u):
        return float("nan")
    ranks = rankdata(np.concatenate([k, u]))
    return float((ranks[: len(k)].sum() - len(k) * (len(k) + 1) / 2) / (len(k) * len(u)))


def open_set_report(known_conf: np.ndarray, unknown_conf: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC of known vs unknown by confidence, and the rates at `threshold`."""
    known_conf, unknown_conf = np.asarray(known_conf), np.asarray(unknown_conf)
    return {"auroc": round(auroc(known_conf, unknown_conf), 4),
            "false_accept_rate": round(float((unknown_conf >= threshold).mean()), 4) if len(unknown_conf) else float("nan"),
            "known_accept_rate": round(float((known_conf >= threshold).mean()), 4) if len(known_conf) else float("nan"),
            "threshold": round(float(threshold), 6), "n_known": int(len(known_conf)), "n_unknown": int(len(unknown_conf))}
