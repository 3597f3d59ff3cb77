"""One training flow, read top to bottom: data -> views -> frozen-backbone features -> head.

    splits = discover(DATA)                 # folders or CSV, seeded stratified split (--shots K per class)
    check_images(...)                       # every file readable? bad ones skipped and counted
    features = extract_features(...)        # K augmented views + 1 clean view per image, cached;
                                            # images decoded as the views need them, never all held
    head = select_head(...)                 # CV on the training features only; winner refit on all
    write model.safetensors, metrics.json, history.csv (the CV table), report.png

The val split is reported, never used to choose anything. With --unfreeze the backbone tail trains
in an epoch loop whose randomness is derived from (seed, epoch) and whose checkpoint holds the
optimizer state, so a resumed run ends exactly where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from toolkit import __version__
from toolkit.backbones import get_spec
from toolkit.errors import EdgetuneError
from toolkit.runs import RunDir, read_safetensors, write_safetensors

if TYPE_CHECKING:
    from toolkit.data import Dataset, ImageStream

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class TrainConfig:
    # Lite1 (240 px) beats Lite0 by 3 points on ants/bees (0.974 vs 0.935 val) for 1.5x the
    # feature time: on OpenVINO that is still well under 10 s for a few hundred images.
    backbone: str = "efficientnet_lite1"
    # auto: the head (and its settings) with the best k-fold CV accuracy on the training features;
    # or one of toolkit.head_fit.HEADS (logreg, prototypes, imprint, linear, mlp).
    head: str = "auto"
    cv_folds: int = 5
    shots: int | None = None  # keep this many training images per class (seeded): few-shot
    generate: str = "none"  # vae: add generated feature points (kept by auto only if CV says so)
    generate_ratio: float = 1.0  # generated points per real training point
    hidden: int = 256  # mlp width
    dropout: float = 0.5  # on the features: the cheapest regulariser for a few hundred images
    epochs: int = 40  # --unfreeze epoch loop (feature heads: epochs are chosen by CV)
    patience: int = 8  # --unfreeze: epochs without a better val score before stopping
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05  # AdamW, on weight matrices only
    label_smoothing: float = 0.1  # keeps a tiny head from becoming over-confident
    mixup: float = 0.2  # Beta(alpha, alpha) feature mixup; 0 turns it off
    views: int = 4  # augmented views per training image in the cache, besides the clean one
    # Frozen ImageNet features already resist small shifts; heavy crops pull the cached views
    # away from the clean view that is deployed (default preset: 0.967 vs light 0.974 on ants/bees).
    augment: str = "light"  # none | light | default | strong
    augment_overrides: dict[str, Any] = field(default_factory=dict)
    balance: str = "none"  # --unfreeze: none | sampler | weights (feature heads always weigh classes equally)
    val_fraction: float = 0.2  # only for DATA/<class>/* layouts
    seed: int = 0
    device: str = "auto"
    # auto: int8 where this machine runs it >= 1.5x faster than fp32 with faithful features
    # (toolkit.precision, measured once per machine); int8: train on the quantized backbone you ship.
    # Not the default: a default train on the int8 Lite1 backbone ends 0.0 / 0.3 CV points below fp32
    # on ants/bees / caltech50 (recipe v4, oneDNN held to AVX2; v3: 0.4-0.5; v1/v2: 0.3-0.8), at the
    # 0.3-point bar, not yet measured on a real AVX2 CPU, and auto chose fp32 on every machine measured.
    backbone_precision: str = "fp32"
    unfreeze: int = 0  # fine-tune the last N backbone blocks in torch (opt-in, much slower)
    workers: int = 2  # decode / augmentation threads

    def validate(self) -> None:
        from toolkit.head_fit import HEADS

        self._check_types()

        choices = {"balance": ("none", "sampler", "weights"), "head": ("auto", *HEADS),
                   "backbone_precision": ("auto", "fp32", "fp16", "int8"), "generate": ("none", "vae")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise EdgetuneError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not '{getattr(self, name)}'.")
        ranges = {"epochs": (1, None), "patience": (1, None), "batch_size": (1, None), "hidden": (1, None),
                  "views": (0, None), "unfreeze": (0, None), "workers": (1, None), "weight_decay": (0, None),
                  "mixup": (0, None), "dropout": (0, 0.95), "label_smoothing": (0, 0.5),
                  "val_fraction": (0.01, 0.9), "lr": (1e-8, 10), "cv_folds": (2, None),
                  "generate_ratio": (0, 100), "seed": (0, 2**32 - 1)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f"at least {low}"
                raise EdgetuneError(f"--{name.replace('_', '-')} must be {bound}, not {value}.")
        if self.shots is not None and self.shots < 1:
            raise EdgetuneError(f"--shots must be at least 1 image per class, not {self.shots}.")
        if self.unfreeze and self.head not in ("linear", "mlp"):
            raise EdgetuneError("--unfreeze trains the head in torch with the backbone: use --head linear or mlp.")
        if self.unfreeze and self.backbone_precision not in ("fp32", "auto"):
            raise EdgetuneError("--unfreeze trains the backbone in torch: use --backbone-precision fp32.")
        get_spec(self.backbone)
        from toolkit.augment import augmentation_config

        augmentation_config(self.augment, self.augment_overrides)  # bad --aug values stop here, before any write

    def _check_types(self) -> None:
        """Python callers get the CLI's one-line error for a wrong type too (views=2.5, epochs="30"),
        before anything is written: a float where an int goes failed deep inside, after config.json."""
        import numbers

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind.startswith("int"):
                ok = (value is None and "None" in kind) or (isinstance(value, numbers.Integral) and not isinstance(value, bool))
                want = "a whole number" + (" or None" if "None" in kind else "")
            elif kind == "float":
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
                want = "a number"
            elif kind == "str":
                ok, want = isinstance(value, str), "a string"
            else:  # augment_overrides
                ok, want = isinstance(value, dict), "a dict {transform: {setting: value}}"
            if not ok:
                raise EdgetuneError(f"TrainConfig.{f.name} must be {want}, not {value!r}.")


@dataclass
class Prepared:
    """Everything training needs from the data side: the checked files, never their pixels.

    Learners stream the images (`stream`): decoded on demand, a few at a time, so memory does not
    grow with the number of images; only their features are kept.
    """

    classes: list[str]
    train: Dataset
    val: Dataset
    min_side: int  # decoded images are shrunk to this shorter side: the views stay byte-identical
    skipped: list[dict[str, str]]
    data_key: str  # fingerprint of the files, for the features cache
    val_copies: list[str] = field(default_factory=list)  # val files left out: copies of training files

    @property
    def train_labels(self) -> np.ndarray:
        return self.train.labels()

    @property
    def val_labels(self) -> np.ndarray:
        return self.val.labels()

    def stream(self, which: str, capacity: int = 8) -> ImageStream:
        """An ImageStream over the 'train' or 'val' images."""
        from toolkit.data import ImageStream

        return ImageStream(getattr(self, which), min_side=self.min_side, capacity=capacity)

    def drop_unreadable(self, which: str, failed: dict[int, str]) -> None:
        """Drop the images a stream of `which` could not decode (they passed the check, then
        changed, or only a full decode found the fault); counted like the files the check skipped."""
        from toolkit.data import without_unreadable

        if failed:
            kept, skipped = without_unreadable(getattr(self, which), failed)
            setattr(self, which, kept)
            self.skipped += [{"path": str(s.path), "reason": s.reason} for s in skipped]


def train(
    data: Path | None,
    out: Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train a head on `data`, writing a run directory at `out`; returns the metrics.

    With resume=True, `data` and `config` come from the run's own config.json.
    """
    t0 = time.perf_counter()
    run = RunDir(out)
    config, data = _resolve(run, data, config, resume)
    progress = progress or (lambda *_: None)
    spec = get_spec(config.backbone)
    plan = _plan_devices(config)  # before decoding: an absent device fails in a second
    prep, split = _prepare_data(Path(data), config, spec.input_size, progress)
    if not resume:  # a resumed run keeps the precision its config.json records
        from toolkit.precision import choose_backbone_precision

        precision = choose_backbone_precision(config.backbone_precision, config.backbone, plan,
                                              unfreeze=config.unfreeze > 0)
        logger.info("Backbone precision %s: %s", precision.precision, precision.reason)
        config = dataclasses.replace(config, backbone_precision=precision.precision)
        # No config.json here (checked above), so any state/ is a leftover, not a resumable run.
        shutil.rmtree(run.path / "state", ignore_errors=True)
        run.write_labels(prep.classes)
        run.write_config({**_config_record(config, data, plan, spec), "backbone_precision": precision.to_json()})
    from toolkit import atomic
    from toolkit.data import SPLIT_FILE

    # Before training, so evaluate can always tell the run's training images from new ones.
    atomic.write_json(run.path / SPLIT_FILE, split)
    del split  # a path and a digest per image: 20 MB at 50,000 images, not needed again
    if config.unfreeze:
        from toolkit.learners import UnfrozenLearner

        learner = UnfrozenLearner(config, prep, plan, run.path / "state", progress)
        history, best, tensors = _epoch_loop(learner, config, run.path / "state", progress)
        return _finish(run, learner, config, prep, history, best, tensors, time.perf_counter() - t0)
    return _fit_on_features(run, config, prep, plan, progress, t0)


def _fit_on_features(run: RunDir, config: TrainConfig, prep: Prepared, plan, progress: Progress, t0: float):
    """Cached features -> head chosen by CV on the training features -> val reported once."""
    from toolkit.data import files_key
    from toolkit.features import imagenet_prior
    from toolkit.head_fit import head_logits, model_tensors
    from toolkit.learners import CachedFeatures
    from toolkit.selection import select_head

    feats = CachedFeatures(config, prep, plan, run.path / "state", progress)
    progress("head selection", 0, 1)
    head_options = {name: _torch_head_options(config, name) for name in ("linear", "mlp")}
    augment = None
    if config.generate == "vae":
        from toolkit.generate import vae_augmenter

        augment = vae_augmenter(config.generate_ratio, seed=config.seed)
    selection = select_head(config.head, feats.train_feats, prep.train_labels, len(prep.classes),
                            folds=config.cv_folds, seed=config.seed, options=head_options, augment=augment,
                            class_names=prep.classes,
                            prior=imagenet_prior(get_spec(config.backbone)) if config.head in ("auto", "prior") else None)
    progress("head selection", 1, 1)
    params = selection.params
    run.write_model(model_tensors(params), {"format": "edgetune-run", "backbone": config.backbone,
                                            "labels": json.dumps(prep.classes)})
    # Exporters and the runtime build the head from config.json's train.head / hidden: record the
    # fitted layout there, and what was asked for beside it (resume asks for the same again).
    record = run.config
    record["train"].update(head=params.kind, hidden=params.hidden or config.hidden)
    record["head_selection"] = selection.to_json()
    if selection.cv is not None:
        from toolkit.calibration import fit_calibration

        # The winner's out-of-fold logits are held-out training images, never val: the temperature
        # and unknown threshold come from them for free, so export need not cross-validate again.
        best = selection.cv.best
        record["calibration"] = fit_calibration(
            best.oof_logits, selection.cv.labels,
            source=f"{selection.cv.folds}-fold out-of-fold logits of {best.label} (head selection)").to_json()
    # Exports check int8 against the run-dir model on the val images: these very features, when
    # the val files are unchanged, instead of running the backbone over them again.
    record["features_cache"] = {"file": feats.cache_path.name, "val_files": files_key(prep.val.samples)}
    run.write_config(record)
    logits = head_logits(params, feats.val_feats)
    pred = logits.argmax(1)
    val_loss = _cross_entropy(logits, prep.val_labels)
    cv_rows = selection.cv.table() if selection.cv is not None else []
    extra = {"head": selection.to_json(), "cv_accuracy": selection.cv_accuracy(), "cv_table": cv_rows,
             "best_epoch": params.options.get("epochs", 0), "epochs_run": params.options.get("epochs", 0),
             **feats.stats()}
    return _write_results(run, prep, pred, val_loss, cv_rows, extra, time.perf_counter() - t0)


def _torch_head_options(config: TrainConfig, head: str) -> dict[str, Any]:
    # The hidden width is the MLP's alone: the CV table must not list a "linear(hidden=256)".
    return {**({"hidden": config.hidden} if head == "mlp" else {}), "dropout": config.dropout,
            "label_smoothing": config.label_smoothing, "mixup": config.mixup, "lr": config.lr,
            "weight_decay": config.weight_decay, "batch_size": config.batch_size}


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def _resolve(run: RunDir, data, config, resume: bool):
    if run.path.exists() and not run.path.is_dir():
        raise EdgetuneError(f"--out {run.path} is a file, not a folder: pick another --out.")
    if resume:
        cfg = RunDir.open(run.path, require_model=False).config
        if cfg.get("adapted"):
            raise EdgetuneError(f"{run.path} was written by `edgetune adapt`, complete as it is: there is nothing to "
                                "resume (resuming would retrain its head without the adaptation).")
        requested = cfg.get("head_selection", {}).get("requested")
        return TrainConfig(**{**cfg["train"], **({"head": requested} if requested else {})}), Path(cfg["data"])
    if (run.path / "config.json").exists():
        raise EdgetuneError(
            f"{run.path} already holds a run: resume it with `edgetune train --resume {run.path}`, "
            "or pick another --out."
        )
    if data is None:
        raise EdgetuneError("No data given: edgetune train DATA --out RUN_DIR.")
    config = config or TrainConfig()
    config.validate()
    return config, Path(data).resolve()


def _prepare_data(data: Path, config: TrainConfig, size: int, progress: Progress) -> tuple[Prepared, dict[str, Any]]:
    """The checked files, and split.json's record of every train and val file."""
    from toolkit.data import check_images, discover, files_key, split_record
    from toolkit.preprocess import eval_resize_shorter

    splits = discover(data, val_fraction=config.val_fraction, seed=config.seed)
    if splits.val is None or len(splits.val) == 0:
        raise EdgetuneError(f"{data} leaves no validation images: add a val/ folder or more images per class.")
    from toolkit.selection import with_shots

    splits.train = with_shots(splits.train, config.shots, config.seed, str(data))
    total = len(splits.train) + len(splits.val)
    done = [0]

    def tick(n: int) -> None:
        progress("check images", done[0] + n, total)

    # Only a validity check here (no pixels kept): the learners decode as they go.
    train_ds, skipped_t = check_images(splits.train, workers=config.workers, progress=tick)
    done[0] = len(splits.train)
    val_ds, skipped_v = check_images(splits.val, workers=config.workers, progress=tick)
    record = split_record(splits)
    _warn_conflicting_copies(train_ds, record)
    val_ds, copies = _without_training_copies(val_ds, record, data)
    prep = Prepared(
        classes=train_ds.classes,
        train=train_ds,
        val=val_ds,
        # A bit larger than the eval view, so random crops still have real detail.
        min_side=eval_resize_shorter(size),
        skipped=[{"path": str(s.path), "reason": s.reason} for s in skipped_t + skipped_v],
        data_key=files_key(train_ds.samples + val_ds.samples),
        val_copies=copies,
    )
    return prep, record


def _warn_conflicting_copies(train, record: dict) -> None:
    """One warning for photos filed under two classes (the same bytes twice in the training split):
    usually a copy dropped in the wrong folder, which teaches the head both labels for one image."""
    digest = {f["path"]: f["sha1"] for f in record["train"]}
    first: dict[str, Any] = {}
    conflicts = []
    for sample in train.samples:
        d = digest.get(str(sample.path.resolve()))
        if d is not None and first.setdefault(d, sample).label != sample.label:
            conflicts.append((first[d], sample))
    if conflicts:
        a, b = conflicts[0]
        logger.warning("%d training images are filed under two classes (same bytes; first: %s as '%s' and %s as '%s'): "
                       "remove the wrong copy", len(conflicts), a.path, train.classes[a.label], b.path,
                       train.classes[b.label])


def _without_training_copies(val, record: dict, data: Path):
    """The val images less the byte-identical copies of training images (a photo filed in both
    splits): the model has seen them, so val accuracy would count them as unseen (evaluate never
    scores them either). split.json records them apart. Returns (val, their paths)."""
    from toolkit.data import exclude_training_images

    kept, copies = exclude_training_images(val, record)
    if not copies:
        return val, []
    paths = [str(s.path.resolve()) for s in copies]
    logger.warning("Left %d of %d val images out of the validation split: they are copies of training images "
                   "(same bytes; first: %s), which val accuracy would count as unseen", len(copies), len(val), paths[0])
    if not kept.samples:
        raise EdgetuneError(f"Every val image in {data} is a copy of a training image: val accuracy needs images "
                            "the model does not train on.")
    left_out = set(paths)
    record["val"] = [f for f in record["val"] if f["path"] not in left_out]
    record["val_copies_of_train"] = paths
    return kept, paths


def _plan_devices(config: TrainConfig):
    from devices import detect_devices, plan_training

    report = detect_devices()
    plan = plan_training(config.device, report.devices, finetune_backbone=config.unfreeze > 0)
    logger.info("Devices: %s", plan.reason)
    return plan


def _config_record(config: TrainConfig, data: Path, plan, spec) -> dict[str, Any]:
    from toolkit.augment import augmentation_config

    return {
        "edgetune_version": __version__,
        "data": str(data),
        "train": dataclasses.asdict(config),
        "backbone": spec.to_json(),
        "augmentation": augmentation_config(config.augment, config.augment_overrides),
        "preprocessing": preprocessing_record(spec),
        "devices": plan.to_json(),
    }


def preprocessing_record(spec, camera_correction: dict[str, Any] | None = None) -> dict[str, Any]:
    """How an image becomes the model input: recorded in runs and in every export (with the
    camera correction of a run adapted to a new camera, toolkit.preprocess.correction_record)."""
    from toolkit.preprocess import describe

    return {
        **describe(spec.input_size),
        **({"camera_correction": camera_correction} if camera_correction else {}),
        "input_range": "0-255 float32, NCHW",
        "normalization": {"mean": list(spec.mean), "std": list(spec.std), "inside_model": True},
    }


# -- the epoch loop -------------------------------------------------------------------------


def _epoch_loop(learner, config: TrainConfig, state_dir: Path, progress: Progress):
    """Train until early stopping; returns (history, best, best model tensors).

    After every epoch one atomic checkpoint holds the learner state, the best weights so far and
    the loop's bookkeeping, so an interrupt anywhere resumes exactly where the last epoch ended.
    """
    ckpt = state_dir / "checkpoint.safetensors"
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "accuracy": -1.0, "loss": float("inf"), "stale": 0}
    best_tensors: dict[str, np.ndarray] = {}
    start = 0
    if ckpt.exists():
        tensors, meta = read_safetensors(ckpt, with_metadata=True)
        status = json.loads(meta["loop"])
        history, best, start = status["history"], status["best"], status["epoch"] + 1
        best_tensors = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        learner.load_state({k: v for k, v in tensors.items() if not k.startswith("best.")})
        logger.info("Resuming at epoch %d (best so far: epoch %d)", start + 1, best["epoch"] + 1)
    for epoch in range(start, config.epochs):
        if best["stale"] >= config.patience:
            break
        train_loss = learner.train_epoch(epoch)
        val_loss, val_acc = learner.validate()
        history.append({"epoch": epoch + 1, "train_loss": round(train_loss, 5),
                        "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5)})
        # Best = highest val accuracy, ties to lower loss: with 100-odd val images accuracy moves
        # in coarse steps, and the loss says which of two equal-accuracy heads is more sure.
        if (val_acc, -val_loss) > (best["accuracy"], -best["loss"]):
            best = {"epoch": epoch, "accuracy": val_acc, "loss": val_loss, "stale": 0}
            best_tensors = learner.model_tensors()
        else:
            best["stale"] += 1
        loop = json.dumps({"epoch": epoch, "history": history, "best": best})
        tensors = {**learner.state(), **{f"best.{k}": v for k, v in best_tensors.items()}}
        write_safetensors(ckpt, tensors, {"loop": loop})
        progress("epochs", epoch + 1, config.epochs)
    return history, best, best_tensors


def _finish(run: RunDir, learner, config, prep: Prepared, history, best, tensors, seconds: float) -> dict[str, Any]:
    run.write_model(tensors, {"format": "edgetune-run", "backbone": config.backbone,
                              "labels": json.dumps(prep.classes)})
    learner.load_model_tensors(tensors)
    val_loss, _, pred = learner.validate(return_predictions=True)
    extra = {"best_epoch": best["epoch"] + 1, "epochs_run": len(history), **learner.stats()}
    return _write_results(run, prep, pred, val_loss, history, extra, seconds)


def _write_results(run: RunDir, prep: Prepared, pred: np.ndarray, val_loss: float, history, extra, seconds: float):
    """metrics.json, history.csv (epochs, or the CV table) and report.png; val is only reported here."""
    from toolkit.report import write_report

    n_cls = len(prep.classes)
    confusion = np.zeros((n_cls, n_cls), np.int64)
    np.add.at(confusion, (prep.val_labels, pred), 1)
    val_acc = float((pred == prep.val_labels).mean())
    metrics = {
        "val_accuracy": round(val_acc, 5),
        "val_loss": round(float(val_loss), 5),
        "train_seconds": round(seconds, 2),
        "images_skipped": len(prep.skipped),
        "skipped": prep.skipped,
        "val_copies_of_train": len(prep.val_copies),
        "n_train": len(prep.train_labels),
        "n_val": len(prep.val_labels),
        "classes": prep.classes,
        # None for a class without val images: no accuracy to report, not 0
        "per_class_accuracy": {c: round(float(confusion[i, i] / confusion[i].sum()), 5) if confusion[i].sum() else None
                               for i, c in enumerate(prep.classes)},
        "confusion": confusion.tolist(),
        **extra,
    }
    if "backbone_precision" in run.config:  # what auto chose and why (speed, fidelity measured here)
        metrics["backbone_precision"] = run.config["backbone_precision"]
    run.write_history([{**{k: v for k, v in row.items() if k != "options"},
                        **({"options": json.dumps(row["options"])} if "options" in row else {})} for row in history])
    run.write_metrics(metrics)
    write_report(run.path / "report.png", history, confusion, prep.classes,
                 title=f"{run.path.name}: val accuracy {val_acc:.3f}")
    return metrics
