"""Evaluate any Predictor (run dir or export bundle) on a labelled dataset.

accuracy, NLL loss, per-class precision/recall/F1, the confusion matrix and the expected
calibration error (15 equal-width confidence bins), with unreadable images skipped and counted.

A number must never include an image the model trained on: the run's split.json lists its
training files (path and sha1), and every evaluation drops those (reported as a count). When
the run's record cannot be found, only a layout that marks its own val images is evaluated.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)

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


def training_record(predictor) -> tuple[dict | None, Path | None, str]:
    """(the record of every image the model behind `predictor` trained on, the run dir, why there
    is none). A run dir: its split.json. A bundle: its source run's split.json, checked to be the
    one it was exported from (a run retrained at the same path is not), plus the files each
    `learn` step since trained on (learned_split.json in the bundle)."""
    import hashlib

    from toolkit.data import LEARNED_SPLIT_FILE, SPLIT_FILE

    info = predictor.info or {}
    run = info.get("run_dir") or info.get("source_run")
    if not run:
        return None, None, "the model's training run is not reachable"
    run = Path(run)
    try:
        text = (run / SPLIT_FILE).read_bytes()
    except OSError:
        return None, run, (f"its training run {run} is gone" if not run.exists() else
                           f"{run} has no split.json (trained by an older edgetune)")
    expected = info.get("source_split_sha256")
    if expected and hashlib.sha256(text).hexdigest() != expected:
        return None, run, f"the run now at {run} is not the one this bundle was exported from (retrained there since?)"
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, run, f"{run / SPLIT_FILE} is corrupt"
    learned = Path(info["bundle_dir"]) / LEARNED_SPLIT_FILE if info.get("bundle_dir") else None
    if learned is not None and learned.is_file():
        record = {**record, "train": record.get("train", []) + json.loads(learned.read_text())["train"]}
    return record, run, ""


def evaluation_set(predictor, data: Path):
    """The images of `data` that may be scored for `predictor`, and what was left out.

    Returns (Dataset, {"training_images_excluded": n, "training_images_checked": bool}).
    """
    from toolkit.data import exclude_training_images, read_eval_layout

    dataset, explicit_val = read_eval_layout(Path(data), predictor.labels)
    record, run, where = training_record(predictor)
    if record is None:
        if not explicit_val:
            raise EdgetuneError(
                f"Cannot tell which images in {data} trained this model ({where}): evaluate on a folder "
                "with train/ and val/, or a CSV with a split column, or retrain the run.")
        logger.warning("No record of the training images (%s): scoring the val images of %s unchecked",
                       run or "no source run", data)
        return dataset, {"training_images_excluded": 0, "training_images_checked": False}
    kept, excluded = exclude_training_images(dataset, record)
    if excluded:
        logger.warning("Left out %d of %d images in %s that trained the model (same file or same bytes)",
                       len(excluded), len(dataset), data)
    if not kept.samples:
        raise EdgetuneError(f"All {len(dataset)} images in {data} trained this model: evaluate on images it never saw "
                            "(its val split, or new ones).")
    return kept, {"training_images_excluded": len(excluded), "training_images_checked": True}


def evaluate(predictor, dataset, *, batch_size: int = 32, workers: int = 2,
             progress: Callable[[str, int, int], None] | None = None, unknown: Path | None = None) -> dict[str, Any]:
    """Metrics of `predictor` on `dataset`: a toolkit.data.Dataset (scored as given), or a path
    (read by `evaluation_set`, so the model's own training images are left out and counted).

    With a calibrated bundle, "calibration" reports ECE before/after its temperature; `unknown`
    (a folder of images of other classes) adds known-vs-unknown AUROC and the false-accept rate
    at the bundle's unknown threshold."""
    from toolkit.data import Dataset, decode_images
    from toolkit.preprocess import eval_resize_shorter

    progress = progress or (lambda *_: None)
    notes: dict[str, Any] = {}
    unknown_files = None
    if unknown is not None:
        from toolkit.predict import expand_inputs

        unknown_files = expand_inputs([Path(unknown)])  # an empty or missing folder fails before the work
    if not isinstance(dataset, Dataset):
        dataset, notes = evaluation_set(predictor, Path(dataset))
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
    result.update(notes)
    result["calibration"] = _calibration_report(predictor, probs_arr, labels, unknown, unknown_files, batch_size)
    return result


def _calibration_report(predictor, probs: np.ndarray, labels: np.ndarray, unknown: Path | None,
                        unknown_files: list[Path] | None, batch_size: int) -> dict[str, Any]:
    from toolkit.calibration import Calibration, open_set_report

    cal = Calibration.from_manifest(predictor.info)
    # softmax(log p / T) == softmax(z / T): the calibrated probabilities without the logits.
    scaled = cal.probabilities(np.log(np.clip(probs, 1e-30, None))) if len(probs) else probs
    report: dict[str, Any] = {**cal.to_json(), "ece_before": round(expected_calibration_error(probs, labels), 5),
                              "ece_after": round(expected_calibration_error(scaled, labels), 5)}
    if unknown_files is not None:
        from toolkit.images import ImageReadError

        views = []
        for f in unknown_files:
            try:
                views.append(predictor.preprocess(f))
            except ImageReadError as e:
                logger.warning("Skipped %s: %s", f, e.reason)
        if not views:
            raise EdgetuneError(f"--unknown {unknown} holds no readable images.")
        unk = np.concatenate([cal.probabilities(predictor.logits(np.stack(views[i : i + batch_size])))
                              for i in range(0, len(views), batch_size)])
        report["open_set"] = open_set_report(scaled.max(axis=1), unk.max(axis=1), cal.unknown_threshold)
    return report
