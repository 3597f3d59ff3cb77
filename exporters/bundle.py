"""The bundle: manifest.json beside the model, and the same facts embedded in the model itself.

A robot needs only the bundle folder: the manifest says which runtime runs the model, what goes
in (size, layout, range, colour, preprocessing) and what comes out (labels). The model file
carries the same keys (ONNX metadata_props, OpenVINO rt_info under "edgetune") so a model copied
on its own still says what it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit import __version__, atomic
from toolkit.convert import save_ir
from toolkit.errors import EdgetuneError
from toolkit.runtime import MANIFEST
from toolkit.train import preprocessing_record

# Training metrics worth carrying into the export (the rest stays in the run).
_METRIC_KEYS = ("val_accuracy", "val_loss", "best_epoch", "epochs_run", "n_train", "n_val", "per_class_accuracy")


def make_manifest(run, exporter, model_file: str, *, parity: dict[str, Any], static_batch: int | None,
                  extra_files: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg, spec, metrics = run.config, run.spec, run.metrics
    return {
        "bundle_version": 1,  # toolkit.learn.BUNDLE_VERSION: what a reader must understand
        "format": exporter.name,
        "runtime": exporter.runtime,
        "precision": exporter.effective_precision,
        "model": model_file,
        "files": sorted({model_file, *(extra_files or [])}),
        "labels": run.labels,
        "input": {"name": "image", "size": spec.input_size, "layout": "NCHW", "dtype": "float32",
                  "range": "0-255", "color": "RGB", "batch": static_batch},
        "outputs": ["logits", "probabilities"],
        # Always the current rule (what predict and the Predictor apply), not the run's old record.
        "preprocessing": preprocessing_record(spec, cfg.get("camera_correction")),
        "backbone": cfg.get("backbone", spec.to_json()),
        # The head the model carries (head selection's choice and its options): `learn` refits that recipe.
        "head": cfg.get("head_selection", {}).get("selected", cfg["train"]["head"]),
        "head_options": cfg.get("head_selection", {}).get("options", {}),
        "source_run": str(Path(run.path).resolve()),
        # Which run that was: evaluate trusts its split.json only while it is this one.
        "source_split_sha256": _split_digest(run),
        "edgetune_version": __version__,
        "training_metrics": {k: metrics[k] for k in _METRIC_KEYS if k in metrics},
        "export_parity": parity,
        **(extra or {}),
    }


def flat_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest as string key/values (what ONNX metadata_props and rt_info hold)."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in manifest.items()
            if k not in ("files",)}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic.write_json(Path(out_dir) / MANIFEST, manifest)


def embed_onnx(model_path: Path, manifest: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"edgetune.{k}": v for k, v in flat_metadata(manifest).items()})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic.write_bytes(model_path, model.SerializeToString())


def embed_openvino(xml_path: Path, manifest: dict[str, Any]) -> None:
    import openvino as ov

    xml_path = Path(xml_path)
    model = ov.Core().read_model(str(xml_path))
    for key, value in flat_metadata(manifest).items():
        model.set_rt_info(value, ["edgetune", key])
    save_ir(model, xml_path)


def read_embedded(model_path: Path) -> dict[str, str]:
    """The edgetune keys embedded in an ONNX model or OpenVINO IR (for tests and `benchmark`)."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        return {p.key[len("edgetune."):]: p.value for p in model.metadata_props if p.key.startswith("edgetune.")}
    import openvino as ov

    model = ov.Core().read_model(str(model_path))
    if not model.has_rt_info(["edgetune"]):
        return {}
    keys = model.get_rt_info(["edgetune"]).astype(dict)
    return {k: model.get_rt_info(["edgetune", k]).astype(str) for k in keys}


# -- robot-side extras: feature memory and calibration -----------------------------------------------

MEMORY_FILE = "features.npz"
MEMORY_PER_CLASS = 128  # enough to keep old classes when `learn` refits; ~2.5 kB per image at fp16
# ...and at most this many in all, spread over the classes (50 classes keep ~20 each): every one
# runs through the exported model, so without a total the export time grew with the dataset.
MEMORY_TOTAL = 1024
MEMORY_CHUNK = 128  # images decoded and run at a time


def memory_picks(labels, cap: int = MEMORY_PER_CLASS, total: int = MEMORY_TOTAL) -> list[int]:
    """Indices of the rows a feature memory keeps: at most `cap` a class and `total` in all, spread
    evenly over each class (deterministic). Export and `learn` both cap with it."""
    from exporters.base import stratified_subset

    labels = [int(c) for c in labels]
    return stratified_subset(labels, min(total, cap * len(set(labels))), per_class=cap)


def _memory_samples(train, cap: int):
    import dataclasses

    picks = memory_picks([s.label for s in train.samples], cap)
    return dataclasses.replace(train, samples=[train.samples[i] for i in picks])


def write_feature_memory(run, model: Path, runtime: str, stage: Path, *, static_batch: int | None,
                         cap: int = MEMORY_PER_CLASS, decoded: dict[Path, Any] | None = None) -> tuple[Any, Any]:
    """features.npz: the bundle's own backbone features of (up to `cap` per class of) the run's
    training images, fp16, so `learn` keeps the old classes without their images. `decoded`: eval
    views (float32 CHW) by file already made for calibration, used instead of decoding those files
    again. Images are decoded and run a chunk at a time, never all held. Returns (features float32,
    labels)."""
    import dataclasses

    import numpy as np

    from exporters.base import _splits
    from toolkit.bundle_model import feature_runner
    from toolkit.data import decode_images
    from toolkit.preprocess import eval_resize_shorter, resize_and_crop
    from toolkit.runtime import run_batched

    size = run.spec.input_size
    from toolkit.selection import with_shots

    # The memory holds what the head learnt from: a --shots run's K images per class, not the whole folder
    # (int8 calibration, which needs no labels, may still use every training image).
    train = run.config["train"]
    found = with_shots(_splits(run).train, train.get("shots"), train["seed"], run.config["data"])
    # Not the files training skipped as unreadable: where calibration decoded every other image, a
    # chunk of only those would stop the memory with "none of the images can be read".
    skipped = {Path(s["path"]) for s in run.metrics.get("skipped", [])}
    subset = _memory_samples(dataclasses.replace(found, samples=[s for s in found.samples if s.path not in skipped]), cap)
    decoded = decoded or {}
    device = "CPUExecutionProvider" if runtime == "onnxruntime" else "CPU"
    runner = feature_runner(model, runtime, device=device, feature_dim=run.spec.feature_dim, batch=static_batch)
    # One float32 NCHW buffer for every chunk, filled view by view: stacking each chunk afresh
    # (88 MB at 240 px) cost more than decoding it (0.7 s of caltech50's 4.3 s feature memory).
    buffer = np.empty((min(MEMORY_CHUNK, len(subset)), 3, size, size), np.float32)
    chunks, labels = [], []
    for start in range(0, len(subset), MEMORY_CHUNK):
        samples = subset.samples[start : start + MEMORY_CHUNK]
        todo = dataclasses.replace(subset, samples=[s for s in samples if s.path not in decoded])
        fresh = {}
        if todo.samples:
            images, kept, _ = decode_images(todo, min_side=eval_resize_shorter(size), workers=2)
            fresh = {s.path: resize_and_crop(img, size).transpose(2, 0, 1) for s, img in zip(kept.samples, images)}
        samples = [s for s in samples if s.path in decoded or s.path in fresh]  # unreadable files left out
        if not samples:
            continue
        for i, s in enumerate(samples):
            buffer[i] = decoded[s.path] if s.path in decoded else fresh[s.path]
        chunks.append(run_batched(runner, buffer[: len(samples)], batch=static_batch).astype(np.float16))
        labels += [s.label for s in samples]
    if not chunks:
        raise EdgetuneError(f"none of the run's training images in {run.config['data']} can be read")
    features, labels = np.concatenate(chunks), np.array(labels, np.int16)
    atomic.write_bytes(Path(stage) / MEMORY_FILE, encode_memory(features, labels, _memory_prior(run)))
    return features.astype(np.float32), labels.astype(np.int64)


def _split_digest(run) -> str | None:
    from toolkit.data import SPLIT_FILE
    from toolkit.runtime import sha256_of

    path = Path(run.path) / SPLIT_FILE
    return sha256_of(path) if path.is_file() else None


def _memory_prior(run):
    """The prior `learn` may need: the run's own (a `prior` head), else the backbone's ImageNet
    classifier, which learn adds to a discriminative linear head when a class has a few images
    (toolkit.learn._choose_head). None for a fine-tuned backbone (--unfreeze), whose features the
    pretrained classifier no longer reads."""
    from toolkit.head_fit import Prior

    own = Prior.from_tensors(run.head_tensors())
    if own is not None or run.config["train"].get("unfreeze"):
        return own
    from toolkit.features import imagenet_prior

    return imagenet_prior(run.spec)


def encode_memory(features, labels, prior=None) -> bytes:
    """features.npz: float16 features, int16 labels, and the backbone's ImageNet classifier where
    there is one, so `learn` fits a prior head (or adds the few-shot rule) without the backbone's weights."""
    import io

    import numpy as np

    # float16 like the features: half the file, and learn's refit writes the weights it fitted with.
    extra = {} if prior is None else {"prior_weight": prior.weight.astype(np.float16), "prior_bias": prior.bias}
    buf = io.BytesIO()
    np.savez_compressed(buf, features=features.astype(np.float16), labels=labels.astype(np.int16), **extra)
    return buf.getvalue()


def decode_memory(path: Path):
    """features.npz as `encode_memory` wrote it: (features float32, labels int64, the head's Prior or None)."""
    import numpy as np

    from toolkit.head_fit import Prior

    with np.load(path) as d:
        prior = Prior(d["prior_weight"].astype(np.float32), d["prior_bias"].astype(np.float32)) \
            if "prior_weight" in d.files else None
        return d["features"].astype(np.float32), d["labels"].astype(np.int64), prior


def memory_manifest(features, labels, labels_names: list[str], *, cap: int = MEMORY_PER_CLASS) -> dict[str, Any]:
    import numpy as np

    counts = np.bincount(labels, minlength=len(labels_names))
    return {"file": MEMORY_FILE, "dtype": "float16", "dim": int(features.shape[1]), "per_class_cap": cap,
            "total_cap": MEMORY_TOTAL,
            "counts": {name: int(n) for name, n in zip(labels_names, counts)},
            "source": "the bundle's own backbone on its own runtime, clean views of the run's training split"}


def heldout_calibration(features, labels, n_classes: int, head: str, *, seed: int = 0, prior=None,
                        options: dict[str, Any] | None = None):
    """Temperature and unknown threshold from out-of-fold logits of `head` (the bundle's head recipe)
    cross-validated on the feature memory: held-out training images, never the val split."""
    from toolkit.calibration import Calibration, fit_calibration
    from toolkit.head_fit import HEADS, cross_validate

    if head not in HEADS:
        return Calibration(source=f"none: head '{head}' has no registered fitting to cross-validate")
    try:
        cv = cross_validate([head], features, labels, n_classes, folds=5, seed=seed, prior=prior,
                            options={head: dict(options)} if options else None)
    except EdgetuneError as e:  # too few images per class to hold any out
        return Calibration(source=f"none: {e}")
    best = cv.best
    return fit_calibration(best.oof_logits, cv.labels,
                           source=f"{cv.folds}-fold out-of-fold logits of {best.label} on the training features")
