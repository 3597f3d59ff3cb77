"""Classify image files and folders with any model edgetune can load (run dir or export)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from toolkit.data import list_images
from toolkit.images import ImageReadError
from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)


def expand_inputs(inputs: Iterable[Path]) -> list[Path]:
    """Files as given, folders expanded to their images (recursively, sorted)."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            files.append(p)
        else:
            raise EdgetuneError(f"{p} does not exist: give image files or folders of images.")
    if not files:
        raise EdgetuneError(f"No images found in {', '.join(map(str, inputs))}.")
    return files


def predict_paths(model: Path, inputs: Iterable[Path], *, top_k: int = 1, device: str = "auto",
                  batch_size: int = 16, unknown_threshold: float | None = None) -> list[dict[str, Any]]:
    """One result per file: {"path", "label", "probability", "unknown", "top": [...]} or {"path", "error"}.

    Probabilities are calibrated with the bundle's temperature; "unknown" applies its threshold
    (or `unknown_threshold`)."""
    from toolkit.classify import load

    classifier = load(Path(model), device=device, unknown_threshold=unknown_threshold)
    predictor = classifier.predictor
    files = expand_inputs(inputs)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        chunk: list[dict[str, Any]] = []
        views, readable = [], []
        for f in files[start : start + batch_size]:
            try:
                views.append(predictor.preprocess(f))
                readable.append(len(chunk))
                chunk.append({"path": str(f)})
            except ImageReadError as e:
                logger.warning("Skipped %s: %s", f, e.reason)
                chunk.append({"path": str(f), "error": e.reason})
        if views:
            for slot, probs in zip(readable, classifier.probabilities(predictor.logits(np.stack(views)))):
                chunk[slot].update(_result(probs, predictor.labels, top_k))
                chunk[slot]["unknown"] = classifier.calibration.is_unknown(chunk[slot]["probability"])
        results += chunk  # input order, skipped files included
    return results


def _result(probs: np.ndarray, labels: list[str], top_k: int) -> dict[str, Any]:
    top = np.argsort(-probs)[: max(1, top_k)]
    return {
        "label": labels[top[0]],
        "probability": round(float(probs[top[0]]), 5),
        "top": [{"label": labels[i], "probability": round(float(probs[i]), 5)} for i in top],
    }
