"""Rare classes among many: the few-shot rule against cross-validation, on training splits.

    python benchmarks/rare_classes.py [--datasets hymenoptera caltech50 tabletop] [--runs NAME=RUN ...] [--no-write]

A robot's data often has a class with a handful of images beside classes with many (a new object
taught from three photos). Both ways a head is fitted meet it: `edgetune train` (every cached view of
each training image; `--head auto` applies the few-shot rule, toolkit.selection.few_shot_rule, once the
smallest class has <= FEW_SHOT_MAX images) and `edgetune learn` (clean views only: the bundle's feature
memory plus the new images; CV of the bundle's own head recipe from 2 images a class). Which serves
such data: the rule, cross-validation (the zoo's winner for train, the recipe's own path for learn), or
both heads' logits summed (a product of experts: argmax of the summed log-probabilities)?

TRAINING-split protocol only (val never read): each class's training images are split in half
(seeded); the held-out halves are scored. R classes (drawn per seed) keep K images of their other
half, every other class keeps its whole half. CV can run from K = 2 (fewer folds when a class has
fewer than 5 images). Cells: accuracy over all held-out images, the rare classes' recall, the other
classes' accuracy. Rewrites the "## Rare classes among many" section of BENCHMARKS.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, run_header, update_benchmarks_md  # noqa: E402
from benchmarks.prior_weight import set_arguments, training_set  # noqa: E402

SECTION = "Rare classes among many"
SHOTS = (2, 3, 5)
SEEDS = {"hymenoptera": 10, "caltech50": 5, "tabletop": 10}
RARE = {"hymenoptera": (1,), "caltech50": (1, 5), "tabletop": (1,)}  # how many classes are made rare, per seed
METHODS = ("rule", "cv", "both")


def scenarios(labels: np.ndarray, n_classes: int, n_rare: int, seed: int):
    """(held-out images, rare classes, {K: training images}) for one seed."""
    rng = np.random.default_rng([seed, 99])
    held, pool = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:len(idx) // 2])
        pool.append(idx[len(idx) // 2:])
    rare = rng.choice(n_classes, n_rare, replace=False)
    train = {k: np.concatenate([p[:k] if c in rare else p for c, p in enumerate(pool)]) for k in SHOTS}
    return np.concatenate(held), rare, train


def settings(recipe: str, prior) -> dict[str, tuple[bool, list[str]]]:
    """setting -> (clean views only, the heads CV chooses among). `train` fits on every cached view;
    `learn` on clean views (a feature memory), CV of the run's own recipe, and of each recipe learn
    adds the rule to (toolkit.learn.PRODUCT_RECIPES), as bundles with those heads would carry them."""
    from toolkit.head_fit import usable_heads
    from toolkit.learn import PRODUCT_RECIPES
    from toolkit.selection import AUTO_HEADS

    out = {"train: CV is the zoo's winner": (False, usable_heads(AUTO_HEADS, prior)),
           f"learn: CV of the run's {recipe}": (True, [recipe])}
    out.update({f"learn: CV of {r} (bundles with that head)": (True, [r]) for r in PRODUCT_RECIPES if r != recipe})
    return out


def compare(features, labels, n_classes: int, seeds: int, n_rare: int, prior, cases: dict[str, tuple[bool, list]]):
    """Mean (accuracy, rare recall, others' accuracy) per (setting, method, K)."""
    from toolkit.head_fit import cross_validate, fit_head, head_logits
    from toolkit.selection import few_shot_rule

    scores: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
    for seed in range(seeds):
        held, rare, train = scenarios(labels, n_classes, n_rare, seed)
        x_held, y_held = features[held, 0], labels[held]
        is_rare = np.isin(y_held, rare)
        for k, tr in train.items():
            for setting, (clean, names) in cases.items():
                x, y = (features[tr][:, :1] if clean else features[tr]), labels[tr]
                rule, rule_opts = few_shot_rule(prior, k)
                cv = cross_validate(names, x, y, n_classes, seed=0, prior=prior).best
                logits = {"rule": head_logits(fit_head(rule, x, y, n_classes, prior=prior, **rule_opts), x_held),
                          "cv": head_logits(fit_head(cv.name, x, y, n_classes, prior=prior, **cv.options), x_held)}
                # The same argmax and softmax as the two heads' logits summed (what learn ships).
                logits["both"] = _log_softmax(logits["rule"]) + _log_softmax(logits["cv"])
                for method, z in logits.items():
                    hit = z.argmax(1) == y_held
                    scores.setdefault((setting, method, k), []).append(
                        (hit.mean(), hit[is_rare].mean(), hit[~is_rare].mean()))
        print(f"seed {seed} done", flush=True)
    return {key: tuple(np.mean(v, axis=0)) for key, v in scores.items()}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def main() -> None:
    args = set_arguments(__doc__, SEEDS)
    t0, start_load = time.perf_counter(), load_average()
    rows = []
    for name in args.datasets:
        run, features, labels, n_classes, prior = training_set(name, args.given)
        chosen = run.config.get("head_selection", {})
        cases = settings(chosen.get("selected", "logreg"), prior)
        seeds = SEEDS.get(name, 10)
        for n_rare in RARE.get(name, (1,)):
            res = compare(features, labels, n_classes, seeds, n_rare, prior, cases)
            for setting in cases:
                for k in SHOTS:
                    cells = " | ".join("{:.4f} / {:.4f} / {:.4f}".format(*res[(setting, m, k)]) for m in METHODS)
                    rows.append(f"| {name} ({n_rare} of {n_classes} classes rare, {seeds} seeds) | {setting} | {k} | "
                                f"{cells} |")
                    print(rows[-1], flush=True)
    lines = [
        *run_header(start_load, t0),
        "",
        "TRAINING-split protocol only (each class's training images halved; the held-out halves scored; the rare "
        "classes keep K images of the other half; val never read). Cells: accuracy over all held-out images / "
        "the rare classes' recall / the other classes' accuracy. `train`: every cached view, CV = the zoo's winner "
        "(what auto would fit without its few-shot rule, which it applies here); `learn`: clean views only (a "
        "bundle's feature memory), CV = the bundle's recipe, its settings by CV (the run's own head, and logistic "
        "regression, imprint and the SGD linear head as bundles with those heads carry them). `both`: the rule's and "
        "CV's logits summed, a product of experts (what `edgetune learn` fits for such a bundle with a class of 2-5 "
        "images):",
        "",
        "| set | setting | K | few-shot rule | CV | both |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(lines))
    if not args.no_write:
        update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
