"""Choosing the head honestly: cross-validation on the training features, never the val split.

    --head auto      every candidate's settings scored by stratified k-fold CV (views of an image
                     share a fold), winner refit on all training features
    --head NAME      that head; its own settings (C, epochs, ...) still chosen by CV
    <= 5 images in a class (auto), or < 2 (any head): CV cannot run or cannot tell heads apart;
                     a rule decides (prototypes of the features and of the backbone's ImageNet
                     posteriors; imprinted prototypes where the backbone has no classifier), and
                     says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from toolkit.head_fit import HEADS, CVResult, HeadParams, Prior, cross_validate, fit_head, one_blas_thread

logger = logging.getLogger(__name__)

# Simplest first: ties in CV accuracy go to the earlier head.
AUTO_HEADS = ("prototypes", "prior", "imprint", "logreg", "linear", "mlp")
# With 1 image per class nothing can be cross-validated. The rule: prototypes of the features and
# of the backbone's ImageNet posteriors, the posteriors at weight PRIOR_RULE_WEIGHT. Measured on
# the TRAINING splits only (K support images per class, scored on the other training images;
# ants/bees 20 seeds, caltech50 10; exported form; `benchmarks/prior_weight.py`, BENCHMARKS.md
# "Few-shot prior weight"), plain feature prototypes -> prior at weight 0.1 / 0.25 / 0.5:
#   ants/bees 1 shot 0.878 -> 0.919 / 0.947 / 0.963; 5 shots 0.950 -> 0.966 / 0.974 / 0.979
#   caltech50 1 shot 0.763 -> 0.788 / 0.795 / 0.793; 5 shots 0.909 -> 0.913 / 0.911 / 0.905
# 0.25 is the largest weight that never fell below plain prototypes on either set: ants/bees' two
# classes are ImageNet classes themselves, caltech50's fifty are partly not (faces, brains,
# cartoon characters), where the posteriors say less and a heavier weight costs.
FEW_SHOT_RULE = "prior"
PRIOR_RULE_WEIGHT = 0.25
FEW_SHOT_RULE_OPTIONS = {"weight": PRIOR_RULE_WEIGHT}
# Where the backbone has no pretrained classifier (or a bundle's head carries none): imprinted
# prototypes with a strong pull, since a single image says little beyond its prototype.
FEW_SHOT_FALLBACK = "imprint"
FEW_SHOT_FALLBACK_OPTIONS = {"reg": 1.0}
# Up to 5 images per class a CV fold holds one image per class, so fold scores are 0/50/100% and
# CV picks whichever flexible head was lucky (ants/bees 5 shots: the SGD head, 6 points below
# prototypes on some seeds): the few-shot rule decides there too.
FEW_SHOT_MAX = 5
# With a few images per class the rule's head matters more than the backbone: with the earlier
# imprint rule, efficientnet_lite2 beat lite1 by 1-3.5 points at 1-5 shots on ants/bees (and edgetune
# suggested it); with the prior rule, on the TRAINING splits (20 / 10 seeds), lite2 wins by only
# +1.8 / +0.8 / +0.2 / +0.1 points at 1 / 2 / 3 / 5 shots on ants/bees and loses by 1.1-1.7 at every
# shot count on caltech50, at 1.35x the inference (`benchmarks/few_shot_backbones.py`): no suggestion.


@dataclass
class Selection:
    params: HeadParams
    requested: str
    reason: str
    cv: CVResult | None = None
    cv_seconds: float = 0.0
    fit_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def cv_accuracy(self) -> dict[str, Any] | None:
        if self.cv is None:
            return None
        best = self.cv.best
        return {"mean": round(best.accuracy, 5), "std": round(best.std, 5), "folds": self.cv.folds,
                "per_fold": [round(a, 5) for a in best.fold_accuracy]}

    def to_json(self) -> dict[str, Any]:
        out = {"requested": self.requested, "selected": self.params.name, "options": self.params.options,
               "kind": self.params.kind, "reason": self.reason, "cv_seconds": round(self.cv_seconds, 2),
               "fit_seconds": round(self.fit_seconds, 2), **self.extra}
        if self.cv is not None:
            others = [c for c in self.cv.best_per_head() if c.name != self.params.name]
            out["runner_up"] = others[0].to_json() if others else None
        return out


def few_shot_rule(prior: Prior | None) -> tuple[str, dict[str, Any]]:
    """The head (and its options) that decides where CV cannot."""
    return (FEW_SHOT_RULE, dict(FEW_SHOT_RULE_OPTIONS)) if prior is not None else \
        (FEW_SHOT_FALLBACK, dict(FEW_SHOT_FALLBACK_OPTIONS))


def select_head(requested: str, features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = 5,
                seed: int = 0, options: dict[str, dict[str, Any]] | None = None,
                augment: Callable | None = None, candidates: tuple[str, ...] = AUTO_HEADS,
                class_names: list[str] | None = None, prior: Prior | None = None) -> Selection:
    """Pick and fit the head for (N, V, D) training features; the val split is never seen here.
    `class_names` name the classes in what it reports (else their indices); `prior` is the
    backbone's own classifier (heads that need one are candidates only with it)."""
    options = options or {}
    counts = np.bincount(labels, minlength=n_classes)
    names = [n for n in candidates if prior is not None or not HEADS[n].needs_prior] if requested == "auto" \
        else [requested]
    if counts.min() < 2 or (requested == "auto" and counts.min() <= FEW_SHOT_MAX):
        rule, rule_options = few_shot_rule(prior)
        name = rule if requested == "auto" else requested
        opts = {**(rule_options if name == rule else {}), **options.get(name, {})}
        small = int(np.argmin(counts))
        shown = repr(class_names[small]) if class_names else small
        reason = (f"class {shown} has {counts[small]} training image(s): too few to cross-validate reliably, "
                  f"so the few-shot rule picks {name} ({HEADS[name].summary})")
        logger.warning(reason)
        t0 = time.perf_counter()
        x, y = _with_generated(features, labels, n_classes, seed, augment)
        with one_blas_thread():
            params = fit_head(name, x, y, n_classes, seed=seed, prior=prior, **opts)
        return Selection(params, requested, reason, fit_seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    cv = cross_validate(names, features, labels, n_classes, folds=folds, seed=seed, options=options, augment=augment,
                        prior=prior)
    cv_seconds = time.perf_counter() - t0
    best = cv.best
    t0 = time.perf_counter()
    x, y = _with_generated(features, labels, n_classes, seed, augment)
    with one_blas_thread():
        params = fit_head(best.name, x, y, n_classes, seed=seed, prior=prior, **best.options)
    setting = "at the simplest setting within one standard error" if HEADS[best.name].ordered_path else \
        "at its best setting"
    reason = f"best {cv.folds}-fold CV accuracy on the training features, {setting} ({best.accuracy:.4f} ± {best.std:.4f})"
    return Selection(params, requested, reason, cv, cv_seconds, time.perf_counter() - t0)


def _with_generated(features, labels, n_classes, seed, augment):
    if augment is None:
        return features, labels
    x = features.reshape(-1, features.shape[-1]) if features.ndim == 3 else features
    y = np.repeat(labels, features.shape[1]) if features.ndim == 3 else labels
    return augment(x, y, n_classes, seed)


def keep_shots(labels: np.ndarray, shots: int, seed: int, classes: list[str], where: str) -> np.ndarray:
    """Indices of `shots` images per class, drawn with a per-class seed (adding a class never
    changes which images another class keeps)."""
    from toolkit.errors import DataError

    keep = []
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if shots > len(idx):
            raise DataError(f"--shots {shots} is more than the {len(idx)} training images of class '{name}' "
                            f"in {where}: use --shots {len(idx)} or fewer.")
        rng = np.random.default_rng([seed, 104729, c])
        keep.append(np.sort(rng.choice(idx, shots, replace=False)))
    return np.concatenate(keep)
