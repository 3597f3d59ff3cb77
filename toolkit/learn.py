"""`edgetune learn BUNDLE DATA --out NEW`: teach a bundle new images or classes on the robot, no torch.

    old classes  <- the bundle's feature memory (features.npz: its training images' features)
    DATA         -> the bundle's own backbone (its own model file, runtime, device; int8 stays int8)
                 -> features, split into fit / held-out (DATA's own val split, or a seeded 20%)
    head         <- toolkit.head_fit: the bundle's head recipe if torch-free, else the best
                    torch-free head by the same cross-validation; a discriminative linear recipe
                    plus train's few-shot rule while a class has 2-5 images; calibration from
                    its out-of-fold logits
    NEW          <- the same model with only the head replaced, verified against the in-memory
                    predictor (features + numpy head), written atomically; BUNDLE is never modified
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)

BUNDLE_VERSION = 1  # manifest.json "bundle_version" this edgetune reads and writes
VERIFY_IMAGES = 16
VERIFY_TOLERANCE = 1e-3  # max |logit diff| x max(1, |logit|): the backbone is bit-identical, only the head moved


@dataclass
class LearnResult:
    out_dir: Path
    labels: list[str]
    head: str
    head_note: str
    table: list[dict[str, Any]]  # per class: n held-out, accuracy before, after
    verification: dict[str, Any]
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    head_options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "labels": self.labels, "head": self.head, "head_options": self.head_options,
                "head_note": self.head_note,
                "per_class": self.table, "verification": self.verification, "seconds": round(self.seconds, 3),
                "memory_counts": self.counts}


def check_bundle(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest after checking its version, model files and their digests."""
    from toolkit.runtime import check_model_files, read_manifest

    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise EdgetuneError(f"{bundle} is not an export bundle (no manifest.json): pass a folder `edgetune export` wrote.")
    manifest = read_manifest(bundle)
    version = manifest.get("bundle_version", 1)
    if not isinstance(version, int) or version > BUNDLE_VERSION:
        raise EdgetuneError(f"{bundle}/manifest.json has bundle_version {version!r}; this edgetune reads up to "
                            f"{BUNDLE_VERSION}: upgrade edgetune on this machine.")
    check_model_files(bundle, manifest)
    return manifest


def _write_training_record(stage: Path, bundle: Path, splits) -> None:
    """The files this step's head trained on (path, sha1), after those of the learn steps before it:
    with the source run's split.json, what `evaluate` must never score (toolkit.evaluate)."""
    import json

    from toolkit import atomic
    from toolkit.data import LEARNED_SPLIT_FILE, split_record

    previous = bundle / LEARNED_SPLIT_FILE
    earlier = json.loads(previous.read_text())["train"] if previous.is_file() else []
    atomic.write_json(stage / LEARNED_SPLIT_FILE, {"train": earlier + split_record(splits)["train"]})


def _onnx_graph_digest(path: Path) -> str:
    import onnx

    return hashlib.sha256(onnx.load(str(path)).graph.SerializeToString()).hexdigest()


def _warm_imports() -> None:
    """Import what head fitting needs (SciPy: ~1 s on a small CPU) in a thread while
    the backbone computes features, instead of after it."""
    import importlib
    import threading

    def run() -> None:
        for name in ("scipy.optimize", "scipy.special"):
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the fitting imports it again and reports the error there
                return

    threading.Thread(target=run, name="edgetune-warm-imports", daemon=True).start()


def _read_memory(bundle: Path, manifest: dict[str, Any]):
    """(features, labels, the head's Prior or None) of the bundle's feature memory."""
    from exporters.bundle import decode_memory

    info = manifest.get("feature_memory")
    if not info or not (bundle / info["file"]).is_file():
        raise EdgetuneError(f"{bundle} has no feature memory: re-export it with this edgetune (`edgetune export`) "
                            "so `learn` can keep its classes.")
    import zipfile

    path = bundle / info["file"]
    damaged = f"{path} is damaged or not this bundle's: copy the bundle again, or re-export it."
    try:
        features, labels, prior = decode_memory(path)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise EdgetuneError(damaged) from e
    names = manifest["labels"]
    counts = info.get("counts")
    if (features.ndim != 2 or features.shape[1] != int(info.get("dim", features.shape[1])) or len(labels) != len(features)
            or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(names))
            or (counts is not None and np.bincount(labels, minlength=len(names)).tolist() != [counts.get(c, 0) for c in names])):
        raise EdgetuneError(damaged)
    return features, labels, prior


def _dataset_views(dataset, size: int, what: str, correction: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """DATA's images as the bundle's model input: the robot's camera, so its camera correction applies."""
    from toolkit.data import decode_images
    from toolkit.preprocess import apply_correction, eval_resize_shorter, resize_and_crop
    from toolkit.runtime import to_nchw_float

    if dataset is None or not len(dataset):
        return np.zeros((0, 3, size, size), np.float32), np.zeros(0, np.int64)
    images, kept, skipped = decode_images(dataset, min_side=eval_resize_shorter(size), workers=2)
    if skipped:
        logger.warning("Skipped %d unreadable %s images", len(skipped), what)
    if not images:
        raise EdgetuneError(f"None of the {len(dataset)} {what} images in {dataset.root} could be read: "
                            "replace the unreadable files.")
    return to_nchw_float(np.stack([apply_correction(resize_and_crop(img, size), correction) for img in images])), \
        kept.labels()


def _folder_classes(data: Path) -> list[str] | None:
    """DATA's class folder names: one class is enough here (the bundle brings the others)."""
    from toolkit.data import _find_child, _subdirs

    if not data.is_dir():
        return None  # a CSV: its own label column
    root = _find_child(data, ["train"]) or data
    return sorted(d.name for d in _subdirs(root)) or None


# Recipes whose refit adds train's few-shot rule to the recipe's own head while a class has 2 to
# FEW_SHOT_MAX images (toolkit.head_fit.with_prior_votes): the discriminative linear heads, each
# measured (BENCHMARKS.md "Rare classes among many"). A `prior` recipe already holds the rule's class
# means; the MLP does not fold into one graph with it.
PRODUCT_RECIPES = ("logreg", "imprint", "linear")


def _choose_head(manifest_head: str, features, labels, n_classes: int, seed: int, prior=None):
    """(head name, options, (out-of-fold logits, labels) or None, note) for the refit. The bundle's
    recipe, its settings by CV; train's few-shot rule where a class has one image. Where a class has
    2-5 images and the recipe is a discriminative linear head (PRODUCT_RECIPES), the recipe plus the
    rule (e.g. "logreg+prior"): CV scores the old classes almost only and fits a head that swamps
    the new class. On held-out training images (benchmarks/rare_classes.py, BENCHMARKS.md "Rare
    classes among many") the sum kept the old classes' accuracy and recognised more of the new ones
    than each such recipe alone on caltech50, ants/bees and a generated set."""
    from toolkit.head_fit import HEADS, cross_validate, usable_heads
    from toolkit.selection import FEW_SHOT_MAX, few_shot_rule

    known = manifest_head in usable_heads(HEADS, prior)
    names = [manifest_head] if known else usable_heads(HEADS, prior)
    note = (f"the bundle's head recipe ({manifest_head})" if known else
            f"the bundle's head '{manifest_head}' is not one this edgetune knows: the best head by cross-validation")
    counts = np.bincount(labels, minlength=n_classes)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:  # train's few-shot rule where the bundle carries its prior
        name, opts = few_shot_rule(prior, 1) if prior is not None else ("prototypes", {})
        return name, opts, None, f"{name}: a class has one image, too few to cross-validate"
    cv = cross_validate(names, features, labels, n_classes, folds=5, seed=seed, prior=prior)
    best = cv.best
    note = f"{note}: {best.label}, {cv.folds}-fold CV accuracy {best.accuracy:.3f}"
    if prior is None or smallest > FEW_SHOT_MAX or best.name not in PRODUCT_RECIPES:
        return best.name, best.options, (best.oof_logits, cv.labels), note
    rule, rule_opts = few_shot_rule(prior, smallest)
    # Same labels, folds and seed: the same splits, so the two out-of-fold logits add row by row.
    votes = cross_validate([rule], features, labels, n_classes, folds=5, seed=seed, prior=prior,
                           options={rule: rule_opts}).best
    return f"{best.name}+{rule}", {**best.options, "prior_weight": rule_opts["weight"]}, \
        (best.oof_logits + votes.oof_logits, cv.labels), \
        f"{note}, plus the few-shot rule ({rule}, a class has {smallest} images)"


def _fit_chosen(name: str, options: dict[str, Any], features, labels, n_classes: int, seed: int, prior=None):
    from toolkit.head_fit import fit_head, with_prior_votes

    if not name.endswith("+prior"):
        return fit_head(name, features, labels, n_classes, seed=seed, prior=prior, **options)
    opts = dict(options)
    weight = opts.pop("prior_weight")
    return with_prior_votes(fit_head(name.removesuffix("+prior"), features, labels, n_classes, seed=seed, **opts),
                            fit_head("prior", features, labels, n_classes, seed=seed, prior=prior, weight=weight))


def learn(bundle: Path, data: Path, out: Path, *, device: str = "auto", forget: tuple[str, ...] = (),
          replace: tuple[str, ...] = (), val_fraction: float = 0.2, seed: int = 0,
          progress: Callable[[str, int, int], None] | None = None) -> LearnResult:
    from exporters import bundle as bundle_io
    from toolkit import atomic
    from toolkit.atomic import staged_dir
    from toolkit.bundle_model import feature_runner, onnx_with_head, openvino_with_head
    from toolkit.calibration import Calibration, fit_calibration
    from toolkit.data import discover
    from toolkit.head_fit import head_logits
    from toolkit.runtime import _pick_device, model_files, onnx_runner, openvino_runner, run_batched, sha256_of

    progress = progress or (lambda *_: None)
    t0 = time.perf_counter()
    bundle, out = Path(bundle), Path(out)
    if out.resolve() == bundle.resolve():
        raise EdgetuneError(f"--out {out} is the input bundle: learn never modifies a bundle; pick a new folder.")
    if out.exists():
        raise EdgetuneError(f"--out {out} already exists: pick a new folder (the old bundle stays as it is).")
    manifest = check_bundle(bundle)
    memory, mem_labels, prior = _read_memory(bundle, manifest)
    old_labels: list[str] = list(manifest["labels"])
    for name in (*forget, *replace):
        if name not in old_labels:
            from toolkit.errors import unknown_choice

            raise unknown_choice("class", name, old_labels, where=f" in {bundle}")
    splits = discover(Path(data), val_fraction=val_fraction, seed=seed, classes=_folder_classes(Path(data)))
    data_classes = splits.train.classes
    missing = [c for c in replace if c not in data_classes]
    if missing:
        raise EdgetuneError(f"--replace-class {missing[0]}: DATA {data} has no folder of that class to replace it with.")
    labels = [c for c in old_labels if c not in forget] + [c for c in data_classes if c not in old_labels]
    if len(labels) < 2:
        raise EdgetuneError(f"A classifier needs at least 2 classes; this would leave {len(labels)} "
                            f"({', '.join(labels) or 'none'}): forget fewer classes or add class folders to {data}.")
    index = {c: i for i, c in enumerate(labels)}

    # The bundle's own backbone on its own runtime and device.
    runtime, size = manifest["runtime"], int(manifest["input"]["size"])
    dim = int(manifest["feature_memory"]["dim"])
    dev = _pick_device(device, runtime)
    static = manifest["input"].get("batch")
    runner = feature_runner(bundle / manifest["model"], runtime, device=dev.id.partition(":")[2], feature_dim=dim,
                            batch=static, with_logits=True)  # the old model's logits: the "before" column
    progress("decode", 0, 2)
    from toolkit.preprocess import correction_table

    correction = correction_table(manifest.get("preprocessing", {}).get("camera_correction"))
    fit_x, fit_y = _dataset_views(splits.train, size, "DATA", correction)
    held_x, held_y = _dataset_views(splits.val, size, "held-out", correction)
    _warm_imports()  # after every bad-input check that reads DATA
    progress("features", 1, 2)
    fit_f = run_batched(runner, fit_x, batch=static)[:, :dim]
    held = run_batched(runner, held_x, batch=static) if len(held_x) else np.zeros((0, dim + len(old_labels)), np.float32)
    held_f, before_logits = held[:, :dim], held[:, dim:]
    remap = np.array([index.get(c, -1) for c in data_classes])
    fit_y, held_y = remap[fit_y], remap[held_y]

    # Old classes from memory (forgotten ones dropped, replaced ones taken from DATA only).
    old_map = np.array([index.get(c, -1) if c not in replace else -1 for c in old_labels])
    mem_y = old_map[mem_labels]
    keep = mem_y >= 0
    features = np.concatenate([memory[keep], fit_f])
    targets = np.concatenate([mem_y[keep], fit_y])
    n_classes = len(labels)
    progress("fit", 0, 1)
    from toolkit.head_fit import one_blas_thread

    with one_blas_thread():
        # The recipe outlives a few-shot refit: once no class is few-shot, the bundle's own head returns.
        recipe = manifest.get("learned", {}).get("recipe") or manifest.get("head", "?")
        head_name, options, oof, note = _choose_head(recipe, features, targets, n_classes, seed, prior)
        params = _fit_chosen(head_name, options, features, targets, n_classes, seed, prior)
    # An int8 bundle stores its head's weights compressed (int8 rows, fp16 logits layers), as export
    # does: the head is rounded so before anything reads it, so the file and every figure agree.
    compress = manifest.get("precision") == "int8"
    if compress:
        from exporters.head_weights import as_compressed

        params = dataclasses.replace(params, tensors=as_compressed(params.tensors, params.kind))
    calibration = fit_calibration(*oof, source=f"out-of-fold logits of {head_name} on memory + DATA") if oof else \
        Calibration(source="none: too few images to hold any out")

    # Before / after on the held-out part of DATA.
    before_labels = list(manifest["labels"])
    table = []
    after_pred = head_logits(params, held_f).argmax(1) if len(held_f) else np.zeros(0, int)
    before_pred = np.array([index.get(before_labels[i], -1) for i in before_logits.argmax(1)], dtype=int)
    for c, name in enumerate(labels):
        m = held_y == c
        row = {"class": name, "n": int(m.sum()), "new": name not in old_labels or name in replace,
               "before": None, "after": None}
        if m.any():
            row["after"] = round(float((after_pred[m] == c).mean()), 4)
            if name in old_labels and name not in replace:
                row["before"] = round(float((before_pred[m] == c).mean()), 4)
        table.append(row)

    # The new bundle: the same model with only the head replaced, verified, staged, moved into place.
    memory_info = manifest["feature_memory"]
    cap = int(memory_info.get("per_class_cap", bundle_io.MEMORY_PER_CLASS))
    keep_rows = bundle_io.memory_picks(targets, cap, int(memory_info.get("total_cap", bundle_io.MEMORY_TOTAL)))
    mem_f, mem_l = features[keep_rows], targets[keep_rows]
    # The backbone is the old one byte for byte: a few images check the rewritten head exactly.
    check_x = np.concatenate([held_x, fit_x])[:VERIFY_IMAGES]
    check_f = np.concatenate([held_f, fit_f])[:VERIFY_IMAGES]
    expected = head_logits(params, check_f)
    with staged_dir(out) as stage:
        progress("write", 0, 1)
        model_name = manifest["model"]
        if runtime == "onnxruntime":
            onnx_with_head(bundle / model_name, stage / model_name, params.tensors, params.kind, compress=compress)
            new_run = onnx_runner(stage / model_name)
        else:
            openvino_with_head(bundle / model_name, stage / model_name, params.tensors, params.kind, dim,
                               compress=compress)
            new_run = openvino_runner(stage / model_name, batch=static, precise=True)
        got = run_batched(new_run, check_x, batch=static)
        diff = float(np.abs(got - expected).max()) if len(got) else 0.0
        scale = max(1.0, float(np.abs(expected).max()) if len(expected) else 1.0)
        agreement = float((got.argmax(1) == expected.argmax(1)).mean()) if len(got) else 1.0
        verification = {"n": int(len(got)), "max_abs_diff": diff, "agreement": agreement,
                        "tolerance": VERIFY_TOLERANCE * scale, "reference": "bundle backbone features + numpy head"}
        if diff > VERIFY_TOLERANCE * scale or agreement < 1.0:
            raise EdgetuneError(f"The rewritten model disagrees with the fitted head (max |logit diff| {diff:.2e}): "
                                f"nothing written to {out}; please report this.")
        atomic.write_bytes(stage / bundle_io.MEMORY_FILE, bundle_io.encode_memory(mem_f, mem_l, prior))
        # ONNX Runtime training artifacts train the OLD head (its classes, its weights): they cannot be
        # rebuilt without the training toolchain, and kept they would train a head this model no longer has.
        stale = set((manifest.get("training") or {}).get("artifacts", []))
        if stale:
            logger.warning("%s: its ONNX Runtime training artifacts (%s) train the old %d-class head, so %s leaves "
                           "them out: keep learning here with `edgetune learn`, or export a retrained run with "
                           "--format ort-training", bundle, ", ".join(sorted(stale)), len(old_labels), out)
        for name in manifest.get("files", []):  # companions (e.g. notes) travel unchanged
            src = bundle / name
            if src.is_file() and not (stage / name).exists() and name != "manifest.json" and name not in stale:
                shutil.copy2(src, stage / name)
        _write_training_record(stage, bundle, splits)
        new_manifest = {
            **{k: v for k, v in manifest.items() if not (stale and k == "training")},
            **({"format": "onnx"} if stale else {}),
            "labels": labels, "head": head_name, "head_options": options, "bundle_version": BUNDLE_VERSION,
            "calibration": calibration.to_json(),
            "feature_memory": {**memory_info, **bundle_io.memory_manifest(mem_f, mem_l, labels, cap=cap)},
            "learned": {"from": str(bundle.resolve()), "data": str(Path(data).resolve()), "head_note": note,
                        "recipe": recipe, "forgot": list(forget), "replaced": list(replace),
                        "added": [c for c in labels if c not in old_labels], "n_new_images": int(len(fit_f)),
                        "history": [*manifest.get("learned", {}).get("history", []), str(bundle.resolve())]},
            "export_parity": verification,
        }
        new_manifest["files"] = sorted(p.name for p in stage.iterdir() if p.is_file())
        embed = bundle_io.embed_onnx if runtime == "onnxruntime" else bundle_io.embed_openvino
        if runtime == "onnxruntime":  # metadata_props only: the graph must come back byte for byte
            graph = _onnx_graph_digest(stage / model_name)
            embed(stage / model_name, new_manifest)
            unchanged = _onnx_graph_digest(stage / model_name) == graph
        else:
            embed(stage / model_name, new_manifest)
            again = run_batched(openvino_runner(stage / model_name, batch=static, precise=True), check_x[:8],
                                batch=static)
            unchanged = np.allclose(again, got[:8], atol=1e-5, rtol=1e-5)
        if not unchanged:
            raise EdgetuneError("The model changed when its metadata was embedded; nothing written. Please report this.")
        new_manifest["sha256"] = {n: sha256_of(stage / n) for n in model_files(new_manifest)}
        bundle_io.write_manifest(stage, new_manifest)
    counts = {labels[c]: int(n) for c, n in enumerate(np.bincount(mem_l, minlength=n_classes))}
    return LearnResult(out, labels, head_name, note, table, verification, time.perf_counter() - t0, counts, options)
