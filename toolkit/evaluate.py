"""Evaluate any Predictor (run dir or export bundle) on a labelled dataset.

accuracy, NLL loss, per-class precision/recall/F1, the confusion matrix and the expected
calibration error (15 equal-width confidence bins), with unreadable images skipped and counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    if not len(labels):
        return 0.0
    conf, pred = probs.max(1), probs.argmax(1)
    hits = (pred == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(hits[mask].mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    n_cls = len(classes)
    pred = probs.argmax(1) if len(labels) else np.zeros(0, np.int64)
    confusion = np.zeros((n_cls, n_cls), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = {}
    for i, name in enumerate(classes):
        tp = confusion[i, i]
        predicted, support = confusion[:, i].sum(), confusion[i].sum()
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(float(precision), 5), "recall": round(float(recall), 5),
                           "f1": round(float(f1), 5), "support": int(support)}
    eps = 1e-12
    loss = float(-np.log(probs[np.arange(len(labels)), labels] + eps).mean()) if len(labels) else 0.0
    return {
        "accuracy": round(float((pred == labels).mean()), 5) if len(labels) else 0.0,
        "n": int(len(labels)),
        "loss": round(loss, 5),
        "ece": round(expected_calibration_error(probs, labels), 5),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": list(classes),
    }


def evaluate(predictor, dataset, *, batch_size: int = 32, workers: int = 2,
             progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Metrics of `predictor` on `dataset` (a toolkit.data.Dataset, or a path for load_eval_set)."""
    from toolkit.preprocess import eval_resize_shorter
    from toolkit.data import Dataset, decode_images, load_eval_set

    progress = progress or (lambda *_: None)
    if not isinstance(dataset, Dataset):
        dataset = load_eval_set(Path(dataset), predictor.labels)
    size = predictor.input_size
    total = len(dataset)
    images, kept, skipped = decode_images(dataset, min_side=eval_resize_shorter(size), workers=workers,
                                          progress=lambda n: progress("decode", n, total))
    labels = kept.labels()
    probs = []
    for i in range(0, len(images), batch_size):
        views = np.stack([predictor.preprocess(img) for img in images[i : i + batch_size]])
        probs.append(predictor.predict(views))
        progress("predict", min(i + batch_size, len(images)), len(images))
    probs_arr = np.concatenate(probs) if probs else np.zeros((0, len(predictor.labels)), np.float32)
    result = classification_metrics(probs_arr, labels, predictor.labels)
    result["images_skipped"] = len(skipped)
    result["skipped"] = [{"path": str(s.path), "reason": s.reason} for s in skipped]
    result["model"] = predictor.describe()
    return result
