"""Where a head learns from: cached backbone features (head selection by CV in toolkit.selection),
or, with --unfreeze, a head plus the backbone's tail trained end to end by the epoch loop.

`cached_train_features(run)` reads a finished run's training features back (export's feature
memory, `learn`), without torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__, atomic
from toolkit.backbones import get_spec
from toolkit.heads import create_head, decay_groups

logger = logging.getLogger(__name__)

INT8_BACKBONE = "backbone-int8.xml"  # in the run dir, when trained with --backbone-precision int8


def engine_for(device, backbone: str, *, precision: str = "fp32", calibration=None):
    """The feature engine for a devices.Device chosen by the planner."""
    from toolkit.features import create_engine

    name = device.id.partition(":")[2]
    if device.runtime.value == "openvino":
        return create_engine(backbone, "openvino", name, precision=precision, calibration=calibration)
    if device.runtime.value == "onnxruntime":
        return create_engine(backbone, "onnxruntime", name, precision=precision)
    return create_engine(backbone, "torch", device.id, precision=precision)


def load_tail(backbone, tail: dict) -> None:
    """Load fine-tuned backbone tensors over the pretrained ones; a key the backbone does not
    have means the weights belong to another architecture, which must never load silently."""
    unexpected = backbone.load_state_dict(tail, strict=False).unexpected_keys
    if unexpected:
        from toolkit.errors import RunDirError

        raise RunDirError(f"Backbone weights do not fit this backbone (e.g. {unexpected[0]}): retrain the run.")


def soft_cross_entropy(logits, targets, weights=None):
    import torch

    loss = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1)
    if weights is not None:
        loss = loss * weights
    return loss.mean()


class _Base:
    """Shared head, optimizer, loss and checkpoint plumbing."""

    def __init__(self, config, prep, plan, state_dir: Path, progress) -> None:
        import torch

        self.torch = torch
        self.config, self.prep, self.plan = config, prep, plan
        self.state_dir, self.progress = Path(state_dir), progress
        self.spec = get_spec(config.backbone)
        self.n_classes = len(prep.classes)
        self.device = torch.device(plan.head.id)
        self._stats: dict[str, Any] = {"devices": plan.reason}
        from toolkit.data import class_weights

        self.class_weight = None
        if config.balance == "weights":
            w = class_weights(prep.train_labels, self.n_classes)
            self.class_weight = torch.from_numpy(w).to(self.device)

    def _targets(self, y, rng: np.random.Generator):
        """Label-smoothed one-hot targets, and the mixup partner permutation and weight."""
        torch = self.torch
        eps = self.config.label_smoothing
        t = torch.full((len(y), self.n_classes), eps / self.n_classes, device=self.device)
        t[torch.arange(len(y)), y] += 1.0 - eps
        lam, perm = 1.0, None
        if self.config.mixup > 0 and len(y) > 1:
            lam = float(rng.beta(self.config.mixup, self.config.mixup))
            perm = torch.from_numpy(rng.permutation(len(y))).to(self.device)
            t = lam * t + (1 - lam) * t[perm]
        return t, lam, perm

    def _step(self, model, x, y, rng: np.random.Generator) -> float:
        """One optimizer step on a batch, with label smoothing and mixup; returns the loss."""
        t, lam, perm = self._targets(y, rng)
        if perm is not None:
            x = lam * x + (1 - lam) * x[perm]
        loss = soft_cross_entropy(model(x), t, self._sample_weights(y))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _sample_weights(self, y):
        return None if self.class_weight is None else self.class_weight[y]

    def _epoch_order(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.config.balance == "sampler":
            from toolkit.data import balanced_indices

            return balanced_indices(labels, len(labels), rng)
        return rng.permutation(len(labels))

    # checkpoint: model tensors plus AdamW moments; param_groups are rebuilt from the config.
    def state(self) -> dict[str, np.ndarray]:
        tensors = self.model_tensors()
        for idx, st in self.optimizer.state_dict()["state"].items():
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = value.detach().cpu().numpy().reshape(value.shape)
        return tensors

    def load_state(self, tensors: dict[str, np.ndarray]) -> None:
        torch = self.torch
        self.load_model_tensors(tensors)
        sd = self.optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = torch.from_numpy(value.copy()).to(
                    self.device if name != "step" else "cpu"
                )
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    def stats(self) -> dict[str, Any]:
        return self._stats


class CachedFeatures:
    """Backbone features of K augmented views (+1 clean, view 0) per training image and of the val
    images, extracted once and cached in the run's state/ (keyed by data, backbone and augmentation),
    so head selection, refits and `learn`'s feature memory never run the backbone again."""

    def __init__(self, config, prep, plan, state_dir: Path, progress) -> None:
        self.config, self.prep, self.plan = config, prep, plan
        self.state_dir, self.progress = Path(state_dir), progress
        self.spec = get_spec(config.backbone)
        self._stats: dict[str, Any] = {"devices": plan.reason}
        self._engine = None
        self.train_feats, self.val_feats = self._features()

    def stats(self) -> dict[str, Any]:
        return self._stats

    # -- features ------------------------------------------------------------------------------
    # Where an int8 backbone's ranges come from: "cached", the machine's one backbone quantized on
    # generated scenes (toolkit.features.cached_int8_backbone); "run", NNCF on this run's own
    # training images every run, which benchmarks/bench_precision.py measures it against.
    int8_calibration = "cached"

    def engine(self):
        if self._engine is None:
            calib = None
            if self.config.backbone_precision == "int8" and self.int8_calibration == "run":
                from toolkit.augment import eval_view

                images = self.prep.stream("train")
                # Spread over the whole (class-ordered) set so every class shapes the int8 ranges.
                picks = np.unique(np.linspace(0, len(images) - 1, min(300, len(images))).round().astype(int))
                calib = [eval_view(im, self.spec.input_size) for im in map(images.get, picks) if im is not None]
            self._engine = engine_for(self.plan.features, self.config.backbone,
                                      precision=self.config.backbone_precision, calibration=calib)
            if self._engine.precision == "int8":
                # The head only fits this exact quantized backbone: keep it with the run, so
                # evaluate/predict/export use it even after the user cache is cleared or remade.
                from toolkit.convert import save_ir

                save_ir(self._engine.model, self.state_dir.parent / INT8_BACKBONE)
        return self._engine

    def _cache_key(self) -> str:
        from toolkit.augment import augmentation_config

        c = self.config
        parts = [__version__, self.prep.data_key, c.backbone, c.backbone_precision, c.views, c.seed,
                 json.dumps(augmentation_config(c.augment, c.augment_overrides), sort_keys=True)]
        return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]

    def _features(self) -> tuple[np.ndarray, np.ndarray]:
        """(train: N x (1+K) x D, val: M x D), from the run's cache when the inputs match."""
        path = self.cache_path = self.state_dir / f"features-{self._cache_key()}.npz"
        if path.exists():
            with np.load(path) as z:
                logger.info("Using cached features from %s", path)
                # Images that failed to decode while the cache was built are left out again.
                for which, failed in json.loads(str(z["unreadable"]) if "unreadable" in z else "{}").items():
                    self.prep.drop_unreadable(which, {int(i): r for i, r in failed.items()})
                return z["train"], z["val"]
        t0 = time.perf_counter()
        engine = self.engine()  # conversion, quantization and compilation: timed apart from views
        t1 = time.perf_counter()
        unreadable: dict[str, dict[int, str]] = {}
        train = self._extract("train", 1 + self.config.views, unreadable)
        val = self._extract("val", 1, unreadable)[:, 0]
        seconds = time.perf_counter() - t1
        n = train.shape[0] * train.shape[1] + len(val)
        self._stats.update({"feature_engine": engine.name, "engine_setup_seconds": round(t1 - t0, 2),
                            "feature_seconds": round(seconds, 2), "views_per_second": round(n / seconds, 1)})
        # Streamed into the file: an in-memory archive would hold the features twice more.
        with atomic.open_for_write(path) as f:
            np.savez(f, train=train, val=val, train_labels=self.prep.train_labels,
                     val_labels=self.prep.val_labels, unreadable=np.array(json.dumps(unreadable)))
        return train, val

    def _extract(self, which: str, views: int, unreadable: dict[str, dict[int, str]]) -> np.ndarray:
        """(N, views, D) float16 features of the `which` images; view 0 is the clean view, the
        others augmented. Images are decoded as their views are built, never all held."""
        from toolkit.augment import build_augmentation, training_view
        from toolkit.features import extract_features, stream_capacity

        c, size = self.config, self.spec.input_size
        aug = build_augmentation(c.augment, size=size, overrides=c.augment_overrides)
        engine = self.engine()
        images = self.prep.stream(which, capacity=stream_capacity(engine.batch, views, c.workers))
        blank = np.zeros((size, size, 3), np.uint8)

        def make_view(k: int) -> np.ndarray:
            i, v = divmod(k, views)
            img = images.get(i)
            if img is None:
                return blank  # unreadable after all: its rows are dropped below
            return training_view(img, i, v, aug, seed=c.seed, size=size)

        total = len(images) * views
        feats = extract_features(engine, make_view, total, workers=c.workers,
                                 progress=lambda d: self.progress(f"{which} features", d, total))
        feats = feats.reshape(len(images), views, -1)
        if images.failed:
            unreadable[which] = images.failed
            self.prep.drop_unreadable(which, images.failed)
            feats = _drop_rows(feats, images.failed)
        return feats


def _drop_rows(feats: np.ndarray, rows: dict[int, str]) -> np.ndarray:
    """`feats` without `rows`, compacted in place (a fancy-index copy would double the memory)."""
    keep = [i for i in range(len(feats)) if i not in rows]
    for dst, src in enumerate(keep):
        if dst != src:
            feats[dst] = feats[src]
    return feats[: len(keep)]


def cached_train_features(run) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 1+K, D), view 0 clean; labels (N,)) of a run's training images, from its
    state/ cache; a RunDirError if the run has none (trained with --unfreeze, or state/ deleted)."""
    from toolkit.errors import RunDirError

    caches = sorted((Path(run.path) / "state").glob("features-*.npz"), key=lambda p: p.stat().st_mtime)
    for path in reversed(caches):
        with np.load(path) as z:
            if "train_labels" in z:
                return z["train"], z["train_labels"]
    raise RunDirError(f"{run.path} has no cached training features in state/: retrain the run.")


class UnfrozenLearner(_Base):
    """Head plus the last N backbone blocks, trained end to end in torch on fresh views.

    BatchNorm stays in eval mode: a few hundred images would wreck ImageNet's statistics.
    """

    def __init__(self, config, prep, plan, state_dir: Path, progress) -> None:
        super().__init__(config, prep, plan, state_dir, progress)
        torch = self.torch
        from toolkit.backbones import create_backbone
        from toolkit.convert import with_normalization

        torch.manual_seed(config.seed)
        backbone = create_backbone(config.backbone)
        n = min(config.unfreeze, self.spec.num_blocks)
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.tail = backbone.tail_parameters(n)
        for p in self.tail:
            p.requires_grad_(True)
        self.tail_names = {name for name, p in backbone.named_parameters() if p.requires_grad}
        self.backbone = backbone
        self.head = create_head(config.head, self.spec.feature_dim, self.n_classes,
                                hidden=config.hidden, dropout=config.dropout)
        self.model = with_normalization(torch.nn.Sequential(backbone, self.head), self.spec).to(self.device)
        groups = decay_groups(self.head, config.weight_decay)
        # The pretrained tail moves ten times slower than the fresh head.
        groups += [{**g, "lr": config.lr * 0.1} for g in decay_groups(backbone, config.weight_decay)]
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr)
        from toolkit.augment import build_augmentation

        self.aug = build_augmentation(config.augment, size=self.spec.input_size, overrides=config.augment_overrides)
        self._stats["unfrozen_blocks"] = n

    def _images(self, which: str, indices):
        """Decode `which` images as a batch needs them (each epoch again: a decode is a few ms
        next to a backward pass through the tail, and memory stays flat in the dataset size)."""
        stream = self.prep.stream(which, capacity=1)
        for i in indices:
            img = stream.get(i)
            if img is None:
                from toolkit.errors import DataError

                raise DataError(f"{stream.dataset.samples[i].path} can no longer be read ({stream.failed[i]}): "
                                "restore it, or remove it and resume the run with `edgetune train --resume`.")
            yield img

    def _batch(self, views: np.ndarray):
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(views.transpose(0, 3, 1, 2))).float()
        return x.to(self.device)

    def train_epoch(self, epoch: int) -> float:
        torch, c = self.torch, self.config
        rng = np.random.default_rng([c.seed, 7919, epoch])
        torch.manual_seed(c.seed * 100_003 + epoch)
        labels = self.prep.train_labels
        order = self._epoch_order(labels, rng)
        self.model.eval()  # BatchNorm frozen; dropout in the head switched on below
        self.head.train()
        losses = []
        for start in range(0, len(order), c.batch_size):
            idx = order[start : start + c.batch_size]
            views = np.stack([self.aug(img, np.random.default_rng([c.seed, 1 + epoch, i]))
                              for i, img in zip(idx, self._images("train", idx))])
            x, y = self._batch(views), torch.from_numpy(labels[idx]).to(self.device)
            losses.append(self._step(self.model, x, y, rng))
            self.progress("batches", min(start + c.batch_size, len(order)), len(order))
        return float(np.mean(losses))

    def _val_views(self, batch: int = 32):
        from toolkit.augment import eval_view

        size, n = self.spec.input_size, len(self.prep.val)
        for i in range(0, n, batch):
            yield np.stack([eval_view(im, size) for im in self._images("val", range(i, min(i + batch, n)))])

    def validate(self, return_predictions: bool = False):
        torch = self.torch
        self.model.eval()
        y = torch.from_numpy(self.prep.val_labels).to(self.device)
        with torch.no_grad():
            logits = torch.cat([self.model(self._batch(views)) for views in self._val_views()])
            loss = torch.nn.functional.cross_entropy(logits, y).item()
            pred = logits.argmax(1)
            acc = (pred == y).float().mean().item()
        return (loss, acc, pred.cpu().numpy()) if return_predictions else (loss, acc)

    def model_tensors(self) -> dict[str, np.ndarray]:
        out = {f"head.{k}": v.detach().cpu().numpy() for k, v in self.head.state_dict().items()}
        for k, v in self.backbone.state_dict().items():
            if k in self.tail_names:
                out[f"backbone.{k}"] = v.detach().cpu().numpy()
        return out

    def load_model_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        torch = self.torch
        self.head.load_state_dict({k[5:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("head.")})
        tail = {k[9:]: torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith("backbone.")}
        load_tail(self.backbone, tail)
