"""The robot-side API: load a bundle, classify camera frames. No torch.

    import toolkit
    clf = toolkit.load("bundle/")                 # an `edgetune export` folder (or a run dir)
    result = clf.classify(frame_bgr)              # a frame as OpenCV gives it
    if not result.unknown:
        print(result.label, result.confidence, result.latency_ms)

Probabilities are calibrated: softmax(logits / T) with the temperature fitted at export on
held-out (cross-validated) training logits, and `unknown` is set when the top probability falls
below the bundle's unknown threshold (chosen to accept a stated share of held-out known images).
Both come from manifest.json ("calibration"); `unknown_threshold=` overrides the threshold.

One Classifier may be shared by threads, each calling it (the runtime keeps one infer request per
calling thread).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from toolkit.calibration import Calibration
from toolkit.runtime import softmax

__all__ = ["Classification", "Classifier", "load"]


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float  # calibrated probability of `label`
    topk: list[tuple[str, float]]
    unknown: bool  # confidence below the bundle's unknown threshold
    latency_ms: float  # preprocessing + model, per frame (a batch's time divided by its size)
    probabilities: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": round(self.confidence, 5), "unknown": self.unknown,
                "topk": [[name, round(p, 5)] for name, p in self.topk], "latency_ms": round(self.latency_ms, 3)}


class Classifier:
    """A loaded model with its labels, calibration and unknown threshold."""

    def __init__(self, predictor, *, top_k: int = 3, unknown_threshold: float | None = None) -> None:
        self.predictor = predictor
        self.labels: list[str] = predictor.labels
        self.input_size: int = predictor.input_size
        self.calibration = Calibration.from_manifest(predictor.info)
        if unknown_threshold is not None:
            self.calibration = self.calibration.with_threshold(unknown_threshold)
        self.top_k = max(1, min(int(top_k), len(self.labels)))

    def describe(self) -> str:
        return self.predictor.describe()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities for raw logits (N, C)."""
        return softmax(np.asarray(logits, np.float32) / self.calibration.temperature)

    def classify(self, frame: np.ndarray, *, rgb: bool = False) -> Classification:
        """One frame (HxWx3 uint8 BGR as OpenCV gives it; rgb=True for RGB; grey and 16-bit too)."""
        return self.classify_batch([frame], rgb=rgb)[0]

    def classify_batch(self, frames: Sequence[np.ndarray], *, rgb: bool = False) -> list[Classification]:
        if not len(frames):
            return []
        t0 = time.perf_counter()
        views = np.stack([self.predictor.preprocess(f, rgb=rgb) for f in frames])
        probs = self.probabilities(self.predictor.logits(views))
        per_frame = (time.perf_counter() - t0) * 1000.0 / len(frames)
        return [self._result(p, per_frame) for p in probs]

    def _result(self, probs: np.ndarray, latency_ms: float) -> Classification:
        order = np.argsort(-probs)[: self.top_k]
        top = [(self.labels[i], float(probs[i])) for i in order]
        confidence = top[0][1]
        return Classification(top[0][0], confidence, top, self.calibration.is_unknown(confidence), latency_ms, probs)


def load(path: str | Path, *, device: str = "auto", top_k: int = 3,
         unknown_threshold: float | None = None) -> Classifier:
    """A Classifier for an export bundle (manifest.json) or a run directory, on `device`."""
    from toolkit.runtime import load_predictor

    return Classifier(load_predictor(Path(path), device=device), top_k=top_k, unknown_threshold=unknown_threshold)
