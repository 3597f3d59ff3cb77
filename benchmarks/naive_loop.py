"""The hand-rolled PyTorch loop edgetune is measured against.

What most people write for "fine-tune a head on a frozen backbone": a torch-Dataset-style loop that
decodes every image from disk with OpenCV each epoch, augments it (the same edgetune `default`
preset, so the views are comparable), runs the frozen backbone in eager PyTorch under no_grad at
batch 16, and trains a linear head with Adam on the features as they come. Validation runs every
epoch on eval_view crops, also decoded from disk.

    python benchmarks/naive_loop.py [--data DIR] [--epochs N | --seconds S]

`run_naive(...)` is what benchmarks/bench_train.py calls, so both run in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

if __package__ in (None, ""):  # run as a script: make `toolkit` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATASETS  # noqa: E402

DEFAULT_DATA = SHARED_DATASETS / "hymenoptera"


@dataclass
class EpochRecord:
    epoch: int
    val_accuracy: float
    elapsed: float  # seconds since run_naive started, after this epoch's validation
    train_views: int
    train_seconds: float  # decode + augment + backbone + head over the training views

    @property
    def views_per_second(self) -> float:
        return self.train_views / self.train_seconds


@dataclass
class NaiveResult:
    backbone: str
    batch_size: int
    setup_seconds: float  # building the backbone and listing the files, before epoch 1
    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def best_accuracy(self) -> float:
        return max((e.val_accuracy for e in self.epochs), default=0.0)

    @property
    def views_per_second(self) -> float:
        """Median training throughput over the epochs run."""
        return float(np.median([e.views_per_second for e in self.epochs])) if self.epochs else 0.0

    def time_to_accuracy(self, threshold: float) -> float | None:
        """Wall seconds from the start until val accuracy first reached `threshold`, if it did."""
        return next((e.elapsed for e in self.epochs if e.val_accuracy >= threshold), None)


def run_naive(
    data: Path = DEFAULT_DATA,
    *,
    backbone: str | None = None,
    epochs: int | None = None,
    seconds: float | None = 60.0,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    augment: str = "default",
    log: Callable[[str], None] | None = None,
) -> NaiveResult:
    """Train a linear head the naive way until `epochs` are done or `seconds` have passed.

    The time budget is checked between epochs, so the last epoch always finishes. `backbone`
    defaults to edgetune's own default (TrainConfig().backbone) so the comparison is like for like.
    """
    t0 = time.perf_counter()
    import torch

    from toolkit.augment import build_augmentation, eval_view
    from toolkit.backbones import create_backbone, get_spec
    from toolkit.convert import with_normalization
    from toolkit.data import discover
    from toolkit.images import read_image
    from toolkit.train import TrainConfig

    if epochs is None and seconds is None:
        raise ValueError("Give epochs, seconds, or both")
    log = log or (lambda _msg: None)
    name = backbone or TrainConfig().backbone
    spec = get_spec(name)
    size = spec.input_size
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    splits = discover(Path(data), seed=seed)
    train_set, val_set = splits.train.samples, splits.val.samples
    n_classes = len(splits.train.classes)
    model = with_normalization(create_backbone(name), spec).eval()
    head = torch.nn.Linear(spec.feature_dim, n_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    aug = build_augmentation(augment, size=size)
    result = NaiveResult(name, batch_size, time.perf_counter() - t0)

    def to_tensor(views: list[np.ndarray]):
        return torch.from_numpy(np.stack(views).transpose(0, 3, 1, 2).astype(np.float32))

    epoch = 0
    while (epochs is None or epoch < epochs) and (seconds is None or time.perf_counter() - t0 < seconds):
        t_train = time.perf_counter()
        head.train()
        order = rng.permutation(len(train_set))
        for start in range(0, len(order), batch_size):
            batch = [train_set[i] for i in order[start : start + batch_size]]
            # A torch Dataset's __getitem__: decode from disk, augment afresh, every epoch.
            views = [aug(read_image(s.path), rng) for s in batch]
            labels = torch.tensor([s.label for s in batch])
            with torch.no_grad():
                feats = model(to_tensor(views))
            loss = torch.nn.functional.cross_entropy(head(feats), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        train_seconds = time.perf_counter() - t_train

        head.eval()
        correct = 0
        with torch.no_grad():
            for start in range(0, len(val_set), batch_size):
                batch = val_set[start : start + batch_size]
                views = [eval_view(read_image(s.path), size) for s in batch]
                pred = head(model(to_tensor(views))).argmax(1)
                correct += int((pred == torch.tensor([s.label for s in batch])).sum())
        epoch += 1
        rec = EpochRecord(epoch, correct / len(val_set), time.perf_counter() - t0, len(order), train_seconds)
        result.epochs.append(rec)
        log(f"naive epoch {epoch}: val accuracy {rec.val_accuracy:.4f}, {rec.views_per_second:.1f} views/s, "
            f"{rec.elapsed:.1f} s elapsed")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default=None, help="default: edgetune's TrainConfig().backbone")
    parser.add_argument("--epochs", type=int, default=None, help="stop after this many epochs")
    parser.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60; 0 = none)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seconds = args.seconds or None
    if args.epochs is not None and args.seconds == 60.0:
        seconds = None  # --epochs alone means exactly that many epochs
    res = run_naive(args.data, backbone=args.backbone, epochs=args.epochs, seconds=seconds, lr=args.lr,
                    seed=args.seed, log=print)
    hit = res.time_to_accuracy(0.954)
    print(f"{res.backbone}: best val accuracy {res.best_accuracy:.4f} in {len(res.epochs)} epochs, "
          f"{res.views_per_second:.1f} views/s, "
          f"time to 0.954: {'not reached' if hit is None else f'{hit:.1f} s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
