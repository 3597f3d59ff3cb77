"""`edgetune adapt RUN UNLABELED_DIR --out RUN2`: fit a trained run to a new camera without labels.

    CORAL   the target images' feature mean and covariance are mapped onto the training images'
            (x -> A (x - mu_t) + mu_s, A = C_s^1/2 C_t^-1/2, Ledoit-Wolf shrunk covariances), and
            that affine map is folded into the head's first linear layer: the export stays one graph.
    AdaBN   (--adabn, fp32 backbones) BatchNorm running statistics re-estimated on the target
            images; stored as backbone.* tensors, which every exporter already ships.

The new run is written beside the old one (never modified), atomically, file by file into a
temporary folder that is renamed at the end.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.errors import DataError, EdgetuneError, RunDirError

logger = logging.getLogger(__name__)

MIN_TARGET_IMAGES = 8  # fewer cannot estimate a feature mean worth trusting


def coral_map(source: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, mu_t, mu_s) with A (x - mu_t) + mu_s carrying target features onto source statistics."""
    from sklearn.covariance import LedoitWolf

    def sqrt_and_inv_sqrt(cov):
        vals, vecs = np.linalg.eigh(cov)
        vals = np.maximum(vals, 1e-6)
        return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T

    # With a few hundred images per side and ~1000 channels the sample covariance is singular:
    # Ledoit-Wolf shrinks it towards a scaled identity by the amount its estimate supports.
    cs = LedoitWolf().fit(source).covariance_
    ct = LedoitWolf().fit(target).covariance_
    cs_half, _ = sqrt_and_inv_sqrt(cs)
    _, ct_inv_half = sqrt_and_inv_sqrt(ct)
    return cs_half @ ct_inv_half, target.mean(0), source.mean(0)


def fold_coral(head: dict[str, np.ndarray], a: np.ndarray, mu_t: np.ndarray, mu_s: np.ndarray) -> dict[str, np.ndarray]:
    """New head tensors computing head(A (x - mu_t) + mu_s) in the same layout:
    (x - mu_t) * s @ W'.T + b' with W' = W diag(inv_std) A diag(1/s), b' = b + W diag(inv_std)(mu_s - m)."""
    m, inv_std, w, b = (head[k].astype(np.float64) for k in ("feature_mean", "feature_inv_std",
                                                             "layers.1.weight", "layers.1.bias"))
    s = inv_std  # keep the per-channel scale the head had: its weights stay in an fp16-safe range
    w_new = (w * inv_std) @ a / s
    b_new = b + (w * inv_std) @ (mu_s - m)
    out = dict(head)
    out.update({"feature_mean": mu_t.astype(np.float32), "feature_inv_std": s.astype(np.float32),
                "layers.1.weight": w_new.astype(np.float32), "layers.1.bias": b_new.astype(np.float32)})
    return out


def adapt(run_path: Path, unlabeled: Path, out: Path, *, adabn: bool = False, workers: int = 2,
          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    from toolkit.learners import INT8_BACKBONE, cached_train_features
    from toolkit.runs import RunDir

    progress = progress or (lambda *_: None)
    run = RunDir.open(run_path)
    out = Path(out)
    if out.exists():
        raise EdgetuneError(f"{out} already exists: pick another --out (the adapted run is written new).")
    if Path(out).resolve() == run.path.resolve():
        raise EdgetuneError("--out must differ from RUN: the original run is never modified.")
    cfg, state = run.config, run.model_state()
    precision = cfg["train"]["backbone_precision"]
    if precision == "int8" and not (run.path / INT8_BACKBONE).is_file():
        raise RunDirError(f"{run.path / INT8_BACKBONE} is missing: the run's int8 backbone is gone; retrain the run.")
    if any(k.startswith("backbone.") for k in state):
        raise EdgetuneError(f"{run.path} has a fine-tuned backbone (--unfreeze or adapted already): adapt the run it came from.")
    if adabn and precision != "fp32":
        raise EdgetuneError("--adabn re-estimates BatchNorm in the fp32 backbone: this run uses an "
                            f"{precision} backbone; drop --adabn (CORAL still applies).")
    source, _ = cached_train_features(run)
    images = _target_images(Path(unlabeled), run.spec.input_size, workers)
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
    tensors: dict[str, np.ndarray] = {}
    if adabn:
        tensors.update(_adabn(run.spec, images, progress))
        target = _torch_features(run.spec, tensors, images)
    else:
        target = _engine_features(run, images, workers, progress)
    a, mu_t, mu_s = coral_map(source[:, 0].astype(np.float64), target.astype(np.float64))
    head = fold_coral(head, a, mu_t, mu_s)
    tensors.update({f"head.{k}": v for k, v in head.items()})
    shift = float(np.linalg.norm(mu_t - mu_s) / max(np.linalg.norm(mu_s), 1e-9))
    record = {"from": str(run.path.resolve()), "target": str(Path(unlabeled).resolve()), "target_images": len(images),
              "methods": ["adabn", "coral"] if adabn else ["coral"], "relative_mean_shift": round(shift, 4)}
    _write_run(run, out, tensors, record)
    return record


def _target_images(folder: Path, size: int, workers: int) -> list[np.ndarray]:
    from toolkit.augment import eval_resize_shorter
    from toolkit.data import Dataset, Sample, decode_images, list_images

    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: give a folder of unlabelled images from the new camera.")
    files = list_images(folder)
    if len(files) < MIN_TARGET_IMAGES:
        raise DataError(f"{folder} holds {len(files)} images: adapt needs at least {MIN_TARGET_IMAGES} "
                        "unlabelled images from the new camera.")
    ds = Dataset([Sample(p, 0) for p in files], ["target"], folder)
    images, _, _ = decode_images(ds, min_side=eval_resize_shorter(size), workers=workers)
    if len(images) < MIN_TARGET_IMAGES:
        raise DataError(f"Only {len(images)} images in {folder} could be read: adapt needs at least {MIN_TARGET_IMAGES}.")
    return images


def _engine_features(run, images, workers, progress) -> np.ndarray:
    from toolkit.augment import eval_view
    from toolkit.features import create_engine, extract_features
    from toolkit.learners import INT8_BACKBONE

    spec, precision = run.spec, run.config["train"]["backbone_precision"]
    if precision == "int8":
        engine = create_engine(spec.name, "openvino", "CPU", precision="int8", ir=run.path / INT8_BACKBONE)
    else:
        engine = create_engine(spec.name, "openvino", "CPU", precision=precision)
    return extract_features(engine, lambda k: eval_view(images[k], spec.input_size), len(images), workers=workers,
                            progress=lambda d: progress("target features", d, len(images)))


def _adabn(spec, images, progress) -> dict[str, np.ndarray]:
    """BatchNorm running mean/var recomputed over the target images (cumulative average)."""
    import torch

    from toolkit.augment import eval_view
    from toolkit.backbones import create_backbone
    from toolkit.convert import with_normalization

    backbone = create_backbone(spec.name)
    model = with_normalization(backbone, spec).eval()
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative: every target image counts the same
        bn.train()
    with torch.no_grad():
        for start in range(0, len(images), 32):
            batch = np.stack([eval_view(im, spec.input_size) for im in images[start:start + 32]])
            model(torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32)))
            progress("adabn", min(start + 32, len(images)), len(images))
    return {f"backbone.{k}": v.numpy().copy() for k, v in backbone.state_dict().items()
            if k.endswith(("running_mean", "running_var"))}


def _torch_features(spec, tensors, images) -> np.ndarray:
    import torch

    from toolkit.augment import eval_view
    from toolkit.backbones import create_backbone
    from toolkit.convert import with_normalization
    from toolkit.learners import load_tail

    backbone = create_backbone(spec.name)
    load_tail(backbone, {k[9:]: torch.from_numpy(v) for k, v in tensors.items() if k.startswith("backbone.")})
    model = with_normalization(backbone, spec).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), 32):
            batch = np.stack([eval_view(im, spec.input_size) for im in images[start:start + 32]])
            out.append(model(torch.from_numpy(batch.transpose(0, 3, 1, 2).astype(np.float32))).numpy())
    return np.concatenate(out)


def _write_run(run, out: Path, tensors: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Config, labels, metrics and the adapted weights into out.partial/, renamed to out at the end;
    state/ is linked by copy of the feature cache so the adapted run can be exported with memory."""
    from toolkit.runs import RunDir

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        new = RunDir(tmp)
        cfg = run.config
        cfg["adapted"] = record
        new.write_config(cfg)
        new.write_labels(run.labels)
        new.write_model(tensors, {"format": "edgetune-run", "backbone": run.spec.name,
                                  "labels": json.dumps(run.labels)})
        metrics = dict(run.metrics)
        metrics["adapted"] = record
        new.write_metrics(metrics)
        for name in ("state", "split.json", "backbone-int8.xml", "backbone-int8.bin"):
            src = run.path / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("checkpoint*"))
            elif src.is_file():
                shutil.copy2(src, tmp / name)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
