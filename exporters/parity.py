"""The one shared check every export passes: the exported model against the source classifier.

Both run on the same validation views (the run's own val split, eval-view preprocessed). For fp32
and fp16 exports the gate is top-1 agreement and the max abs logit difference; for int8 it is the
accuracy drop, which fails the export only beyond --max-drop.
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


def measure(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray) -> Parity:
    ref_top, exp_top = reference.argmax(1), exported.argmax(1)
    return Parity(
        n=len(labels),
        agreement=round(float((ref_top == exp_top).mean()), 6),
        max_abs_diff=float(np.abs(reference - exported).max()),
        logit_scale=float(np.abs(reference).max()),
        source_accuracy=round(float((ref_top == labels).mean()), 6),
        export_accuracy=round(float((exp_top == labels).mean()), 6),
    )


def check(parity: Parity, *, fmt: str, tolerance: float | None, min_agreement: float,
          max_drop: float | None, relative: bool = False) -> None:
    """Raise EdgetuneError("Export failed parity: ...") when `parity` is outside the gate.

    relative=True scales the tolerance by max(1, largest |logit|): fp16 weights err relative to
    the magnitude of what they compute.
    """
    problems = []
    if tolerance is not None:
        tolerance = tolerance * max(1.0, parity.logit_scale) if relative else tolerance
        if parity.max_abs_diff > tolerance:
            problems.append(f"max |logit diff| {parity.max_abs_diff:.3e} > tolerance {tolerance:.0e}")
        if parity.agreement < min_agreement:
            problems.append(f"top-1 agreement {parity.agreement:.2%} < {min_agreement:.2%}")
    if max_drop is not None and parity.accuracy_drop > max_drop:
        problems.append(f"val accuracy drop {parity.accuracy_drop:.2f} points > --max-drop {max_drop}")
    if problems:
        raise EdgetuneError(
            f"Export failed parity: {fmt} vs the source model on {parity.n} val images: "
            f"{'; '.join(problems)}. Nothing was written. "
            + ("Try a larger --max-drop, --calib with more images, or the fp32/fp16 format."
               if tolerance is None else "This is a converter problem: please report it with the run's config.json.")
        )
    logger.info("%s parity: %s", fmt, parity.summary())


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
