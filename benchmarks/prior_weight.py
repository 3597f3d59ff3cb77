"""Few-shot: the weight of the ImageNet-posterior prototypes in the "prior" head, on training splits.

    python benchmarks/prior_weight.py [--datasets hymenoptera caltech50 tabletop] [--runs NAME=RUN ...] [--no-write]

(--runs also adds sets of your own: `--datasets parts --runs parts=runs/parts`, 20 seeds.)

The measurement behind toolkit.selection.prior_rule_weight (the few-shot rule's weight). On the
cached features of a default run (small_data's, or --runs; "tabletop" is `edgetune demo`'s generated
set, 40 training images a class, drawn shapes unlike any ImageNet photo), the TRAINING-split protocol only: K
support images per class drawn from the training images (seeded per seed), the head fitted on all
their views with toolkit.head_fit (the exported form: each side divided by its typical norm),
scored on the clean view of every other training image. Val is never read. Columns: plain feature
prototypes (weight 0), then the prior head at each weight. Rewrites the "## Few-shot prior weight"
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, run_header, update_benchmarks_md  # noqa: E402
from benchmarks.small_data import default_run, run_features, support_and_query  # noqa: E402

SECTION = "Few-shot prior weight"
SHOTS = (1, 2, 3, 5)
SEEDS = {"hymenoptera": 20, "caltech50": 10, "tabletop": 20}
WEIGHTS = (0.1, 0.25, 0.5, 1.0)


def tabletop_run() -> Path:
    """A default run of the generated tabletop set (cached beside small_data's runs)."""
    from benchmarks import small_data
    from toolkit.synthetic import make_tabletop_dataset
    from toolkit.train import TrainConfig, train

    root = small_data.CACHE / "tabletop"
    if not (root / "run" / "metrics.json").exists():
        make_tabletop_dataset(root / "data", per_class=40, val_per_class=15)
        train(root / "data", root / "run", TrainConfig())
    return root / "run"


def set_arguments(doc: str, datasets) -> argparse.Namespace:
    """The command line the training-split benchmarks share: --datasets, --runs NAME=RUN, --no-write;
    `given` maps each --runs name to its run."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(datasets))
    ap.add_argument("--runs", nargs="*", default=[], metavar="NAME=RUN", help="reuse this run's cached features")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    args.given = dict(r.split("=", 1) for r in args.runs)
    return args


def training_set(name: str, given: dict[str, str]):
    """(run, training features, labels, classes, the backbone's prior) of a set: the cached features of
    its --runs run, else of a default run (cached in /tmp). Val is not read."""
    from toolkit.backbones import get_spec
    from toolkit.features import imagenet_prior
    from toolkit.runs import RunDir

    out = Path(given[name]) if name in given else tabletop_run() if name == "tabletop" else default_run(name)[1]
    features, labels, _, _, n_classes = run_features(out)
    run = RunDir.open(out)
    return run, features, labels, n_classes, imagenet_prior(get_spec(run.spec.name))


def training_split(train, labels, n_classes: int, seeds: int, prior) -> dict[tuple[int, float], float]:
    """Mean accuracy per (shots, weight); weight 0 = plain prototypes."""
    from toolkit.head_fit import fit_head, head_logits
    from toolkit.selection import prior_rule_weight

    acc: dict[tuple[int, float], list[float]] = {}
    for k in SHOTS:
        for seed in range(seeds):
            support, query = support_and_query(labels, n_classes, k, seed)
            heads = {0.0: fit_head("prototypes", train[support], labels[support], n_classes)}
            heads.update({w: fit_head("prior", train[support], labels[support], n_classes, prior=prior, weight=w)
                          for w in (*WEIGHTS, prior_rule_weight(k))})
            for w, params in heads.items():
                pred = head_logits(params, train[query, 0]).argmax(1)
                acc.setdefault((k, w), []).append(float((pred == labels[query]).mean()))
    return {key: float(np.mean(v)) for key, v in acc.items()}


def main() -> None:
    from toolkit.selection import prior_rule_weight

    args = set_arguments(__doc__, SEEDS)
    t0, start_load = time.perf_counter(), load_average()
    rows = []
    for name in args.datasets:
        _, train, ytr, n_classes, prior = training_set(name, args.given)
        seeds = SEEDS.get(name, 20)
        res = training_split(train, ytr, n_classes, seeds, prior)
        for k in SHOTS:
            base = res[(k, 0.0)]
            rows.append(f"| {name} ({seeds} seeds) | {k} | {base:.4f} | " +
                        " | ".join(f"{res[(k, w)]:.4f} ({100 * (res[(k, w)] - base):+.1f})"
                                   for w in (*WEIGHTS, prior_rule_weight(k))) + f" ({prior_rule_weight(k):.3g}) |")
            print(rows[-1], flush=True)
    lines = [
        *run_header(start_load, t0),
        "",
        "TRAINING-split protocol only (K support images per class from the training images, scored on every other "
        "training image's clean view; val never read). Accuracy, and points over plain feature prototypes:",
        "",
        "| set | shots | prototypes | " + " | ".join(f"prior, weight {w}" for w in WEIGHTS) + " | the rule (its weight) |",
        "|---|---|---|" + "---|" * (len(WEIGHTS) + 1),
        *rows,
    ]
    print("\n".join(lines))
    if not args.no_write:
        update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
