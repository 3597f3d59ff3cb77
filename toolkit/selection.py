"""Choosing the head honestly: cross-validation on the training features, never the val split.

    --head auto      every candidate's settings scored by stratified k-fold CV (views of an image
                     share a fold); each head would ship its simplest setting within one standard
                     error of its best, and the head whose shipped setting scores best is refit on
                     all training features
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

from toolkit.head_fit import HEADS, CVResult, HeadParams, Prior, cross_validate, fit_head, one_blas_thread, usable_heads

logger = logging.getLogger(__name__)

# Simplest first: ties in CV accuracy go to the earlier head.
AUTO_HEADS = ("prototypes", "prior", "imprint", "logreg", "linear", "mlp")
# With 1 image per class nothing can be cross-validated. The rule: prototypes of the features and
# of the backbone's ImageNet posteriors, the posteriors weighted by prior_rule_weight(K) for K
# images in the smallest class: min(0.25, 0.5 / K), the prior trusted less as the class means it
# corrects are estimated from more images (their noise falls as 1/K). Measured on the TRAINING
# splits only (K support images per class, scored on the other training images; ants/bees 20
# seeds, caltech50 10, and a generated tabletop set, drawn shapes unlike any ImageNet photo, 20;
# `benchmarks/prior_weight.py`, BENCHMARKS.md "Few-shot prior weight"), points over plain feature
# prototypes at weight 0.1 / 0.25 / 0.5:
#   1 shot   ants/bees +4.1 / +6.9 / +8.5   caltech50 +2.6 / +3.2 / +3.1   tabletop +1.1 / +1.5 / +0.0
#   2 shots  ants/bees +4.1 / +5.6 / +6.3   caltech50 +1.3 / +1.7 / +1.3   tabletop +1.1 / +1.2 / +0.1
#   5 shots  ants/bees +1.6 / +2.4 / +2.9   caltech50 +0.4 / +0.2 / -0.4   tabletop +0.3 / -0.4 / -1.8
# Heavier weights win where the classes are ImageNet-like (ants/bees: two ImageNet classes) and
# cost where they are not (caltech50's faces and cartoons, the drawn tabletop objects); the rule's
# weights (0.25 at 1-2 shots, 0.1 at 5) are the largest that gained on all three sets there.
FEW_SHOT_RULE = "prior"


def prior_rule_weight(images_per_class: int) -> float:
    """The few-shot rule's weight of the ImageNet-posterior prototypes for this many images in the
    smallest class."""
    return min(0.25, 0.5 / max(1, int(images_per_class)))


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
            others = [c for c in self.cv.per_head() if c.name != self.params.name]
            out["runner_up"] = others[0].to_json() if others else None
        return out


def few_shot_rule(prior: Prior | None, images_per_class: int) -> tuple[str, dict[str, Any]]:
    """The head (and its options) that decides where CV cannot, for this many images in the
    smallest class."""
    if prior is None:
        return FEW_SHOT_FALLBACK, dict(FEW_SHOT_FALLBACK_OPTIONS)
    return FEW_SHOT_RULE, {"weight": prior_rule_weight(images_per_class)}


def select_head(requested: str, features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = 5,
                seed: int = 0, options: dict[str, dict[str, Any]] | None = None,
                augment: Callable | None = None, candidates: tuple[str, ...] = AUTO_HEADS,
                class_names: list[str] | None = None, prior: Prior | None = None) -> Selection:
    """Pick and fit the head for (N, V, D) training features; the val split is never seen here.
    `class_names` name the classes in what it reports (else their indices); `prior` is the
    backbone's own classifier (heads that need one are candidates only with it)."""
    options = options or {}
    counts = np.bincount(labels, minlength=n_classes)
    names = usable_heads(candidates, prior) if requested == "auto" else [requested]
    if counts.min() < 2 or (requested == "auto" and counts.min() <= FEW_SHOT_MAX):
        rule, rule_options = few_shot_rule(prior, int(counts.min()))
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
    setting = "its simplest setting within one standard error of its best" if HEADS[best.name].ordered_path else \
        "its best setting"
    reason = (f"best {cv.folds}-fold CV accuracy on the training features among the settings the heads would ship, "
              f"here {setting} ({best.accuracy:.4f} ± {best.std:.4f})")
    return Selection(params, requested, reason, cv, cv_seconds, time.perf_counter() - t0)


def _with_generated(features, labels, n_classes, seed, augment):
    if augment is None:
        return features, labels
    x = features.reshape(-1, features.shape[-1]) if features.ndim == 3 else features
    y = np.repeat(labels, features.shape[1]) if features.ndim == 3 else labels
    return augment(x, y, n_classes, seed)


def with_shots(dataset, shots: int | None, seed: int, where: str):
    """`dataset` (a toolkit.data.Dataset) cut to `shots` images per class as `--shots` keeps them;
    unchanged when shots is None. Training and the exports' feature memory call this, so the memory
    holds the images the head learnt from."""
    if shots is None:
        return dataset
    import dataclasses

    keep = keep_shots(dataset.labels(), int(shots), seed, dataset.classes, where)
    return dataclasses.replace(dataset, samples=[dataset.samples[i] for i in keep])


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
