"""The one shared check every export passes: the exported model against the source classifier.

Both run on the same validation views (the run's own val split, eval-view preprocessed). For fp32
and fp16 exports the gate is top-1 agreement and the max abs logit difference; for int8 it is an
accuracy budget (`Budget`): by default at most 0.5 points of val accuracy lost, >= 98% top-1
agreement, and no class losing more than 5 points. The val split is only checked here, never used
to choose how to quantize.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)


@dataclass
class Parity:
    n: int
    agreement: float  # fraction of val images with the same top-1 class
    max_abs_diff: float  # largest |logit_source - logit_export|
    logit_scale: float  # largest |logit_source|: fp16 tolerances scale with it
    source_accuracy: float
    export_accuracy: float
    worst_class: str | None = None  # the class that lost most accuracy (of those with MIN_CLASS_IMAGES)
    worst_class_drop: float = 0.0  # its drop, in points

    @property
    def accuracy_drop(self) -> float:
        """In percentage points (positive = the export is worse)."""
        return round(100.0 * (self.source_accuracy - self.export_accuracy), 4)

    def to_json(self) -> dict:
        return {**asdict(self), "accuracy_drop_points": self.accuracy_drop}

    def summary(self) -> str:
        return (f"top-1 agreement {self.agreement:.2%} on {self.n} val images, max |logit diff| "
                f"{self.max_abs_diff:.2e}, accuracy {self.source_accuracy:.2%} -> {self.export_accuracy:.2%}")


def source_logits(classifier, inputs: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Logits of the torch source classifier on float32 NCHW inputs."""
    import torch

    out = []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch_size):
            out.append(classifier(torch.from_numpy(inputs[i : i + batch_size])).float().numpy())
    return np.concatenate(out)


# Per-class drops are judged only on classes with at least this many val images: with fewer, one
# image is more than the 5-point limit and the per-class figure is noise (caltech50 has 10 a class).
MIN_CLASS_IMAGES = 20


def measure(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray,
            class_names: list[str] | None = None) -> Parity:
    ref_top, exp_top = reference.argmax(1), exported.argmax(1)
    worst, worst_drop = None, 0.0
    for c in np.unique(labels):
        mine = labels == c
        if mine.sum() < MIN_CLASS_IMAGES:
            continue
        drop = 100.0 * float((ref_top[mine] == c).mean() - (exp_top[mine] == c).mean())
        if drop > worst_drop:
            worst, worst_drop = (class_names[c] if class_names else str(int(c))), round(drop, 4)
    return Parity(
        n=len(labels),
        agreement=round(float((ref_top == exp_top).mean()), 6),
        max_abs_diff=float(np.abs(reference - exported).max()),
        logit_scale=float(np.abs(reference).max()),
        source_accuracy=round(float((ref_top == labels).mean()), 6),
        export_accuracy=round(float((exp_top == labels).mean()), 6),
        worst_class=worst,
        worst_class_drop=worst_drop,
    )


DEFAULT_MAX_DROP = 0.5  # points of val accuracy an int8 export may lose by default
MIN_AGREEMENT = 0.98  # top-1 agreement with the source an int8 export must keep by default
MAX_CLASS_DROP = 5.0  # points any one class may lose by default


@dataclass(frozen=True)
class Budget:
    """How far an int8 export may stray from its source on the run's val images.

    `--max-drop X` sets the overall drop (rounded up to one val image: `allowed_drop`); the
    agreement floor loosens with it (flips go both ways, so a net drop of X comes with ~4X points of
    disagreement) but never tightens past 98%, and the per-class limit is max(5, X). `allow`
    (--allow-drop) writes an over-budget export anyway, with the miss recorded in the manifest.
    """

    max_drop: float = DEFAULT_MAX_DROP
    min_agreement: float = MIN_AGREEMENT
    max_class_drop: float = MAX_CLASS_DROP
    allow: bool = False

    @classmethod
    def from_options(cls, max_drop: float | None = None, allow: bool = False) -> "Budget":
        if max_drop is None:
            return cls(allow=allow)
        return cls(max_drop=max_drop, min_agreement=min(MIN_AGREEMENT, 1.0 - 4.0 * max_drop / 100.0),
                   max_class_drop=max(MAX_CLASS_DROP, max_drop), allow=allow)

    def allowed_drop(self, n_images: int) -> float:
        """The drop allowed on `n_images` val images, in points. A val set cannot resolve less than
        one image: on ants/bees' 153 one image is 0.65 points, so a 0.5-point budget would mean "not
        one image lost" and fail exports that agree 99.35% with their source. A non-zero budget is
        therefore rounded up to one image; 0 stays exact."""
        if self.max_drop <= 0 or n_images <= 0:
            return self.max_drop
        return max(self.max_drop, 100.0 / n_images)

    def misses(self, parity: Parity) -> list[str]:
        """What `parity` is outside of, in words (empty: within budget)."""
        out = []
        allowed = self.allowed_drop(parity.n)
        if parity.accuracy_drop > allowed + 1e-3:  # accuracy_drop is rounded to 1e-4 points
            rounded = f" (one of the {parity.n} val images)" if allowed > self.max_drop else ""
            out.append(f"val accuracy drop {parity.accuracy_drop:.2f} points > {allowed:.2f}{rounded}")
        if parity.agreement < self.min_agreement:
            out.append(f"top-1 agreement {parity.agreement:.2%} < {self.min_agreement:.0%}")
        if parity.worst_class_drop > self.max_class_drop:
            out.append(f"class '{parity.worst_class}' drops {parity.worst_class_drop:.1f} points > {self.max_class_drop:g}")
        return out

    def to_json(self) -> dict:
        return asdict(self)


def small_photo_hint(photo_side: int | None, input_size: int) -> str:
    """What to add to an int8 budget failure when the run's photos are under half the model's input
    side: upscaled photos are where int8 misses (96-px copies of ants/bees failed both int8 formats
    where fp16 agreed 100%; 128-px caltech50 passed: BENCHMARKS.md "int8 on kinds of photos nobody
    tuned for")."""
    if not photo_side or photo_side >= input_size / 2:
        return ""
    return (f" This run's photos are small (median shorter side {photo_side} px, upscaled to {input_size}): "
            "int8 misses most on such photos, so try the fp16 'openvino' format first.")


def check(parity: Parity, *, fmt: str, tolerance: float | None, min_agreement: float,
          budget: Budget | None = None, relative: bool = False, hint: str = "") -> list[str]:
    """Raise EdgetuneError("Export failed parity: ...") when `parity` is outside the gate; return
    the budget misses an --allow-drop export is written with (empty when within budget). `hint` ends
    an int8 budget failure's message (`small_photo_hint`).

    fp32/fp16 (`tolerance` set): logits within tolerance and top-1 agreement >= min_agreement;
    relative=True scales the tolerance by max(1, largest |logit|), as fp16 weights err relative to
    the magnitude of what they compute. int8 (`tolerance` None): `budget`.
    """
    if tolerance is not None:
        problems = []
        tolerance = tolerance * max(1.0, parity.logit_scale) if relative else tolerance
        if parity.max_abs_diff > tolerance:
            problems.append(f"max |logit diff| {parity.max_abs_diff:.3e} > tolerance {tolerance:.0e}")
        if parity.agreement < min_agreement:
            problems.append(f"top-1 agreement {parity.agreement:.2%} < {min_agreement:.2%}")
        if problems:
            raise EdgetuneError(
                f"Export failed parity: {fmt} vs the source model on {parity.n} val images: "
                f"{'; '.join(problems)}. Nothing was written. "
                "This is a converter problem: please report it with the run's config.json."
            )
        logger.info("%s parity: %s", fmt, parity.summary())
        return []
    budget = budget or Budget()
    misses = budget.misses(parity)
    if misses and not budget.allow:
        raise EdgetuneError(
            f"Export failed its accuracy budget: {fmt} vs the source model on {parity.n} val images "
            f"(accuracy {parity.source_accuracy:.2%} -> {parity.export_accuracy:.2%}, agreement {parity.agreement:.2%}, "
            f"{_worst_class(parity)}), also after "
            f"accuracy-controlled quantization: {'; '.join(misses)}. Nothing was written. Try --calib with "
            "more images like the robot's, a larger --max-drop, --allow-drop to write it anyway, or the "
            f"fp16 'openvino' / fp32 'onnx' format.{hint}"
        )
    if misses:
        logger.warning("%s IS OUTSIDE ITS ACCURACY BUDGET (%s); written anyway because of --allow-drop: %s",
                       fmt, "; ".join(misses), parity.summary())
    else:
        logger.info("%s parity: %s", fmt, parity.summary())
    return misses


def run_dir_logits(run, inputs: np.ndarray) -> np.ndarray:
    """Logits of the run-dir model (what `edgetune evaluate RUN` scores) on float32 NCHW 0-255 views,
    on the OpenVINO CPU engine: for an int8-trained run, its saved int8 backbone + the head."""
    from toolkit.runtime import load_predictor, run_batched

    predictor = load_predictor(run.path, device="openvino:CPU")
    views = np.ascontiguousarray(inputs.transpose(0, 2, 3, 1).round().clip(0, 255).astype(np.uint8))
    return run_batched(predictor.logits, views, batch=None)


def _worst_class(parity) -> str:
    if not parity.worst_class or parity.worst_class_drop <= 0:
        return "no class loses accuracy"
    return f"worst class {parity.worst_class} -{parity.worst_class_drop:.1f} points"


def reference_logits(ctx, inputs: np.ndarray, *, int8: bool) -> np.ndarray:
    """What an export (its ExportContext `ctx`) is checked against. fp32/fp16 exports: the torch
    source classifier (a converter check, to 1e-3). int8 exports: the run-dir model, the one
    `edgetune evaluate RUN` scored (for a run trained on an int8 backbone, that backbone + its
    head); its fp32 form is the torch source to ~1e-4, and it runs ~10x faster than eager torch.
    While the val files are those training extracted (ctx.val_files), the run's own cached val
    features give those logits without running the backbone at all."""
    if int8:
        cached = cached_val_logits(ctx.run, ctx.val_files) if ctx.val_files else None
        return cached if cached is not None and len(cached) == len(inputs) else run_dir_logits(ctx.run, inputs)
    return cached_source_logits(ctx.run, ctx.classifier, inputs)


def cached_val_logits(run, val_files: str) -> np.ndarray | None:
    """The run-dir head on the val features training cached in state/ (the logits metrics.json's
    val accuracy scored), or None when they may not be this model's: other val files, no cache,
    or a backbone with weights of its own (adapt's AdaBN, --unfreeze), which the cache predates."""
    record = run.config.get("features_cache") or {}
    if record.get("val_files") != val_files or run.has_backbone_weights or run.config.get("camera_correction"):
        return None  # (a camera correction: the cache holds the val images uncorrected)
    try:
        with np.load(run.path / "state" / record["file"]) as z:
            features = z["val"].astype(np.float32)
    except (OSError, KeyError, ValueError):
        return None
    return np.asarray(run.numpy_head()(features), np.float32)


# Source logits per (run, weights file state, inputs): exporting several formats of one run in a
# process (the benchmark, the tests) runs the slow eager-torch source once.
_SOURCE_CACHE: dict[tuple, np.ndarray] = {}


def cached_source_logits(run, classifier, inputs: np.ndarray) -> np.ndarray:
    import hashlib

    st = (run.path / "model.safetensors").stat()
    key = (str(run.path.resolve()), st.st_mtime_ns, st.st_size, inputs.shape,
           hashlib.sha1(inputs[:, :, ::16, ::16].tobytes()).hexdigest())
    if key not in _SOURCE_CACHE:
        _SOURCE_CACHE[key] = source_logits(classifier, inputs)
    return _SOURCE_CACHE[key]
