"""Few-shot: which backbone's features, lite1 (the default) or lite2, with 1-10 images per class.

    python benchmarks/few_shot_backbones.py [--datasets hymenoptera caltech50]
                                            [--runs NAME:BACKBONE=RUN ...] [--no-write]

Per dataset and backbone, one default `train()` with that backbone caches its features (clean +
augmented views); then, on those features only:
  - the TRAINING-split protocol, which is what decides: K support images per class drawn from the
    training images, the few-shot rule's head fitted on their views, scored on the clean
    view of every other training image (20 seeds for ants/bees, 10 for caltech50);
  - the val split, reported only: small_data.grid's cells (K images per class, seeded as `--shots`)
    for prototypes and auto, 20 seeds.
Rewrites the "## Few-shot backbones" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import load_average, run_header, update_benchmarks_md  # noqa: E402
from benchmarks.small_data import DATASETS, default_run, grid, run_features, support_and_query  # noqa: E402

SECTION = "Few-shot backbones"
BACKBONES = ("efficientnet_lite1", "efficientnet_lite2")
SPLIT_SHOTS = (1, 2, 3, 5, 10)
VAL_SHOTS = ("1", "2", "5")
SEEDS = {"hymenoptera": 20, "caltech50": 10}


def backbone_run(name: str, backbone: str, given: dict[str, str]) -> Path:
    """A default run of `name` with `backbone`: given, or small_data's cached default run."""
    return Path(given[f"{name}:{backbone}"]) if f"{name}:{backbone}" in given else default_run(name, backbone)[1]


def training_split(train: np.ndarray, labels: np.ndarray, n_classes: int, seeds: int, backbone: str) -> dict[int, float]:
    from toolkit.backbones import get_spec
    from toolkit.features import imagenet_prior
    from toolkit.head_fit import fit_head, head_logits
    from toolkit.selection import few_shot_rule

    prior = imagenet_prior(get_spec(backbone))

    out = {}
    for k in SPLIT_SHOTS:
        rule, rule_options = few_shot_rule(prior, k)
        accs = []
        for seed in range(seeds):
            support, query = support_and_query(labels, n_classes, k, seed)
            params = fit_head(rule, train[support], labels[support], n_classes, seed=seed, prior=prior,
                              **rule_options)
            accs.append(float((head_logits(params, train[query, 0]).argmax(1) == labels[query]).mean()))
        out[k] = float(np.mean(accs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS))
    ap.add_argument("--runs", nargs="*", default=[], metavar="NAME:BACKBONE=RUN",
                    help="reuse a default run of that dataset and backbone")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    given = dict(r.split("=", 1) for r in args.runs)
    start_load, t0 = load_average(), time.perf_counter()
    split_rows, val_rows = [], []
    for name in args.datasets:
        split, val = {}, {}
        for backbone in BACKBONES:
            out = backbone_run(name, backbone, given)
            train, ytr, xval, yva, n_classes = run_features(out)
            full = json.loads((out / "metrics.json").read_text())
            split[backbone] = training_split(train, ytr, n_classes, SEEDS[name], backbone)
            print(f"{name} {backbone} training split: {split[backbone]}", flush=True)
            cells = grid(train, ytr, xval, yva, n_classes, VAL_SHOTS, 20, ("prototypes", "prior", "imprint", "logreg"), (), 0,
                         backbone=backbone)
            val[backbone] = ({s: np.mean(cells[(s, "auto")]) for s in VAL_SHOTS},
                             {s: np.mean(cells[(s, "prototypes")]) for s in VAL_SHOTS},
                             (full["cv_accuracy"] or {}).get("mean"), full["val_accuracy"])
        lite1, lite2 = (split[b] for b in BACKBONES)
        split_rows.append(f"| {name} ({SEEDS[name]} seeds) | " + " | ".join(
            f"{lite1[k]:.4f} / {lite2[k]:.4f} ({100 * (lite2[k] - lite1[k]):+.1f})" for k in SPLIT_SHOTS) + " |")
        for backbone in BACKBONES:
            auto, protos, cv, full_val = val[backbone]
            val_rows.append(f"| {name} | {backbone} | " + " | ".join(f"{auto[s]:.4f} ({protos[s]:.4f})" for s in VAL_SHOTS)
                            + f" | CV {cv:.4f}, val {full_val:.4f} |")
    lines = [
        *run_header(start_load, t0),
        "",
        "Decides: the TRAINING-split protocol (K support images per class from the training images, the few-shot "
        "rule's head fitted on their views, scored on every other training image's clean view). "
        "lite1 / lite2 accuracy (lite2 - lite1, points):",
        "",
        "| set | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in SPLIT_SHOTS) + " |",
        "|---|" + "---|" * len(SPLIT_SHOTS),
        *split_rows,
        "",
        "Reported only (val split, 20 seeds, K images per class as `--shots K` keeps them): auto (prototypes), "
        "and the default run on all images:",
        "",
        "| set | backbone | " + " | ".join(f"{s} shot{'s' if s != '1' else ''}" for s in VAL_SHOTS) + " | all images |",
        "|---|---|" + "---|" * (len(VAL_SHOTS) + 1),
        *val_rows,
    ]
    print("\n".join(lines))
    if not args.no_write:
        update_benchmarks_md(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
