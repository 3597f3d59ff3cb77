"""The shape every exporter has, and the one flow they all go through.

    stage a temp dir -> exporter.build() -> parity on the run's val images -> manifest + embedded
    metadata -> move into place

A subclass sets its name, runtime, precision and tolerance and implements `build`; everything else
(inputs, parity gate, bundle, atomicity) is shared, so a failed export leaves no partial files.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from toolkit.preprocess import eval_resize_shorter, resize_and_crop
from toolkit.errors import EdgetuneError
from toolkit.runs import RunDir
from toolkit.runtime import MANIFEST, run_batched

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
# Images an int8 export calibrates on (class-stratified). Measured on held-out training images of
# ants/bees, caltech50 and 128-px caltech50 (BENCHMARKS.md "int8 calibration subset size"): 128
# agree as well as 300 or every training image, within one image of 500 for either format and
# within the spread between random subsets of one size, at 1/2 of 300's calibration time.
MAX_CALIBRATION = 128


@dataclass
class ExportResult:
    format: str
    out_dir: Path
    model: Path
    files: dict[str, int]  # name -> bytes
    parity: dict[str, Any]
    manifest: dict[str, Any]


@dataclass
class ExportContext:
    """What an exporter needs besides the run: its classifier and its val and calibration inputs,
    each made on first use and once."""

    run: RunDir
    calibration: Path | None = None
    max_drop: float | None = None
    allow_drop: bool = False  # int8: write an over-budget export anyway (recorded in the manifest)
    static: bool = False
    fp32: bool = False
    progress: Progress = lambda *_: None
    _val: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    val_files: str | None = field(default=None, repr=False)  # toolkit.data.files_key of the val images read
    _calib: np.ndarray | None = field(default=None, repr=False)
    _calib_paths: list[Path] = field(default_factory=list, repr=False)
    photo_side: int | None = field(default=None, repr=False)  # median shorter side of the val photos (px, <= resize)
    extra: dict[str, Any] = field(default_factory=dict)  # exporter notes for the manifest
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per export stage (manifest)

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time a stage of the export and report it. manifest.json's export_seconds holds every stage
        that ended before the manifest was written (not "embed + verify", which writes it; "total" stops there too)."""
        self.progress(name, 0, 1)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    @functools.cached_property
    def classifier(self):
        """The run's classifier as one torch module, built on first use: int8 exports of a frozen
        backbone start from the cached backbone IR and may never need it."""
        return self.run.build_classifier()

    @property
    def budget(self):
        from exporters.parity import Budget

        return Budget.from_options(self.max_drop, self.allow_drop)

    @property
    def input_size(self) -> int:
        return self.run.spec.input_size

    @property
    def static_batch(self) -> int | None:
        return 1 if self.static else None

    def val_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 NCHW 0-255 eval views, labels) of the run's validation split."""
        if self._val is None:
            from toolkit.data import files_key

            with self.stage("val images"):
                views, kept, self.photo_side = _val_views(self.run)
                self._val, self.val_files = (views, kept.labels()), files_key(kept.samples)
        return self._val

    def calibration_inputs(self) -> np.ndarray:
        """float32 NCHW eval views for int8 calibration: --calib images, else the run's training split."""
        if self._calib is None:
            with self.stage("calibration images"):
                self._calib, self._calib_paths = calibration_views(self.run, self.calibration, MAX_CALIBRATION)
        return self._calib

    def decoded_views(self) -> dict[Path, np.ndarray]:
        """Eval views (float32 CHW) already decoded for calibration, by file: the feature memory
        reuses them rather than decoding the same training images twice."""
        if self._calib is None:
            return {}
        return dict(zip(self._calib_paths, self._calib))


class Exporter(abc.ABC):
    """One export target. Subclasses set the class attributes and implement `build`."""

    name: ClassVar[str] = "?"
    runtime: ClassVar[str] = "onnxruntime"  # "onnxruntime" | "openvino": what runs the model file
    precision: ClassVar[str] = "fp32"
    tolerance: ClassVar[float | None] = 1e-3  # max abs logit diff; None: int8, gated on accuracy drop
    min_agreement: ClassVar[float] = 1.0  # top-1 agreement required when tolerance is set
    relative_tolerance: ClassVar[bool] = False  # tolerance x max(1, largest |logit|) (fp16)
    description: ClassVar[str] = ""

    def __init__(self, ctx: ExportContext | None = None) -> None:
        self.ctx = ctx
        self.effective_precision = self.precision

    @abc.abstractmethod
    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        """Write the model (and any companion files) into `out_dir`; return the model file path.
        The run's torch classifier is `ctx.classifier`."""

    def tolerance_for(self, ctx: ExportContext) -> float | None:
        return self.tolerance

    def build_with_accuracy_control(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path | None:
        """int8 only: redo `build` keeping the layers that cost most in float, for when the plain
        quantization misses the accuracy budget. None: this format has no such path."""
        return None

    def fallbacks(self) -> list[tuple[str, Callable[[RunDir, Path, ExportContext], Path | None]]]:
        """int8 only: (what, build) tried in order while the accuracy budget is missed, cheapest first;
        each rewrites the model in the staging folder and is checked on the val images as the plain one is."""
        return [("accuracy-controlled quantization", self.build_with_accuracy_control)]

    def runner(self, model: Path, ctx: ExportContext) -> Callable[[np.ndarray], np.ndarray]:
        """float32 NCHW -> logits with the model's own runtime, for the parity check."""
        from toolkit.runtime import onnx_runner, openvino_runner

        if self.runtime == "openvino":
            return openvino_runner(model, batch=ctx.static_batch, precise=True)
        return onnx_runner(model)

    def embed(self, model: Path, manifest: dict[str, Any]) -> None:
        from exporters import bundle

        if model.suffix == ".onnx":
            bundle.embed_onnx(model, manifest)
        else:
            bundle.embed_openvino(model, manifest)

    # -- the shared flow -------------------------------------------------------------------
    def export(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> ExportResult:
        from exporters import bundle, parity
        from toolkit.atomic import staged_dir

        _check_out_dir(out_dir, run)
        started = time.perf_counter()
        inputs, labels = ctx.val_inputs()
        int8 = self.tolerance_for(ctx) is None
        with ctx.stage("reference"):
            reference = parity.reference_logits(ctx, inputs, int8=int8)
        try:
            with staged_dir(out_dir) as stage:
                with ctx.stage("build"):
                    model = Path(self.build(run, stage, ctx))
                with ctx.stage("parity"):
                    exported = run_batched(self.runner(model, ctx), inputs, batch=ctx.static_batch)
                    measured = parity.measure(reference, exported, labels, run.labels)
                misses = ctx.budget.misses(measured) if int8 else []
                tried = ctx.extra.get("quantizer", "plain int8 quantization")
                for what, fallback in self.fallbacks() if misses else []:
                    logger.warning("%s: %s misses the accuracy budget (%s): trying %s", self.name, tried,
                                   "; ".join(misses), what)
                    with ctx.stage(what):
                        rebuilt = fallback(run, stage, ctx)
                        if rebuilt is None:
                            continue
                        model, tried = Path(rebuilt), what
                        exported = run_batched(self.runner(model, ctx), inputs, batch=ctx.static_batch)
                        measured = parity.measure(reference, exported, labels, run.labels)
                    misses = ctx.budget.misses(measured)
                    if not misses:
                        break
                misses = parity.check(measured, fmt=self.name, tolerance=self.tolerance_for(ctx),
                                      min_agreement=self.min_agreement, budget=ctx.budget,
                                      relative=self.relative_tolerance and not ctx.fp32,
                                      hint=parity.small_photo_hint(ctx.photo_side, ctx.input_size))
                if run.int8_backbone is not None and not int8:
                    _note_backbone_mismatch(self.name, run, inputs, labels, exported, ctx)
                record = {**measured.to_json(), "tolerance": self.tolerance_for(ctx), "max_drop": ctx.max_drop,
                          "relative_tolerance": self.relative_tolerance and not ctx.fp32}
                if int8:
                    record["budget"] = ctx.budget.to_json()
                    if misses:  # written anyway: --allow-drop
                        record["over_budget"] = misses
                        ctx.extra["accuracy_warning"] = (f"{self.name} misses its accuracy budget ({'; '.join(misses)}) "
                                                         "and was written only because of --allow-drop")
                with ctx.stage("feature memory"):
                    robot = _robot_extras(run, model, self.runtime, stage, ctx)
                with ctx.stage("embed + verify"):
                    files = sorted(p.name for p in stage.iterdir() if p.is_file())
                    manifest = bundle.make_manifest(run, self, model.name, parity=record, static_batch=ctx.static_batch,
                                                    extra_files=files, extra={**ctx.extra, **robot})
                    manifest["export_seconds"] = {**ctx.seconds, "total": round(time.perf_counter() - started, 3)}
                    self.embed(model, manifest)
                    manifest["sha256"] = _model_digests(stage, manifest)  # `learn` refuses an edited model file
                    bundle.write_manifest(stage, manifest)
                    _check_unchanged_by_embedding(self.runner(model, ctx), inputs, exported, ctx)
                sizes = {p.name: p.stat().st_size for p in sorted(stage.iterdir()) if p.is_file()}
        except OSError as e:
            raise EdgetuneError(f"Cannot write the export to {out_dir} ({e.strerror or e}): pick another --out.") from None
        return ExportResult(self.name, out_dir, out_dir / model.name, sizes, record, manifest)


def _robot_extras(run: RunDir, model: Path, runtime: str, stage: Path, ctx: ExportContext) -> dict[str, Any]:
    """Feature memory (for `learn`) and calibration (temperature, unknown threshold) of the bundle."""
    from exporters import bundle

    try:
        features, labels = bundle.write_feature_memory(run, model, runtime, stage, static_batch=ctx.static_batch,
                                                       decoded=ctx.decoded_views())
    except EdgetuneError as e:  # a graph without the standard head: the bundle still runs, `learn` cannot use it
        logger.warning("No feature memory in this bundle (%s)", e)
        return {}
    calibration = run.config.get("calibration")  # fitted at training from head selection's CV
    if calibration is None:  # a run without CV (--unfreeze, older runs): cross-validate the memory
        chosen = run.config.get("head_selection", {})
        head = chosen.get("selected", run.config["train"]["head"])
        from toolkit.head_fit import Prior

        # The head that ships, with its own settings (not re-chosen on the memory).
        calibration = bundle.heldout_calibration(features, labels, len(run.labels), head,
                                                 seed=run.config["train"].get("seed", 0),
                                                 prior=Prior.from_tensors(run.head_tensors()),
                                                 options=chosen.get("options")).to_json()
    return {"feature_memory": bundle.memory_manifest(features, labels, run.labels), "calibration": calibration}


def _model_digests(stage: Path, manifest: dict[str, Any]) -> dict[str, str]:
    from toolkit.runtime import model_files, sha256_of

    return {name: sha256_of(stage / name) for name in model_files(manifest)}


# -- inputs ------------------------------------------------------------------------------------


def _views(images: list[np.ndarray], size: int, correction: np.ndarray | None = None) -> np.ndarray:
    from toolkit.preprocess import apply_correction, resize_and_crop
    from toolkit.runtime import to_nchw_float

    return to_nchw_float(np.stack([apply_correction(resize_and_crop(img, size), correction) for img in images]))


def _splits(run: RunDir):
    from toolkit.data import discover

    cfg = run.config
    data = Path(cfg["data"])
    if not data.exists():
        raise EdgetuneError(
            f"The run's dataset {data} is gone: exports check parity on its val images. "
            "Restore it at that path (or retrain the run on the data's new location)."
        )
    return discover(data, val_fraction=cfg["train"]["val_fraction"], seed=cfg["train"]["seed"], classes=run.labels)


def val_set(run: RunDir) -> tuple[np.ndarray, np.ndarray]:
    """The run's own validation split, exactly as training validated it."""
    views, kept, _ = _val_views(run)
    return views, kept.labels()


def _val_views(run: RunDir):
    """(float32 NCHW eval views, the val Dataset without unreadable files, the median shorter side of
    the decoded photos: their own where under the eval resize, which they are only shrunk to)."""
    from toolkit.data import SPLIT_FILE, decode_images, exclude_training_images
    from toolkit.preprocess import correction_table

    size = run.spec.input_size
    val = _splits(run).val
    if val is not None and (run.path / SPLIT_FILE).is_file():
        # As training reported it: without val files that are copies of training files.
        record = json.loads((run.path / SPLIT_FILE).read_text())
        val, _ = exclude_training_images(val, record)
    if val is None or not len(val):
        raise EdgetuneError(f"The run's dataset {run.config['data']} has no validation images to check parity on.")
    images, kept, _ = decode_images(val, min_side=eval_resize_shorter(size), workers=2)
    side = int(np.median([min(img.shape[:2]) for img in images])) if images else None
    # An adapted run's bundle corrects every frame for its camera, as `evaluate RUN` does: the val
    # accuracy an export reports is the one evaluate gives. (Calibration keeps the training photos
    # as they are: corrected frames of the new camera look like them.)
    return _views(images, size, correction_table(run.config.get("camera_correction"))), kept, side


def calibration_set(run: RunDir, calibration: Path | None, limit: int) -> np.ndarray:
    """float32 NCHW eval views of up to `limit` images, spread evenly over the source."""
    return calibration_views(run, calibration, limit)[0]


def calibration_views(run: RunDir, calibration: Path | None, limit: int) -> tuple[np.ndarray, list[Path]]:
    """(float32 NCHW eval views, their files): a class-stratified subset of at most `limit` of the
    run's training images, or of --calib's images spread evenly; unreadable files skipped."""
    from toolkit.data import decode_images, list_images
    from toolkit.images import ImageReadError
    from toolkit.preprocess import model_input
    from toolkit.runtime import to_nchw_float

    size = run.spec.input_size
    bad: list[str] = []
    if calibration is None:
        train = _splits(run).train
        subset = dataclasses.replace(train, samples=[train.samples[i] for i in
                                                     stratified_subset([s.label for s in train.samples], limit)])
        images, kept, skipped = decode_images(subset, min_side=eval_resize_shorter(size), workers=2)
        paths, where = [s.path for s in kept.samples], f"the run's training images ({run.config['data']})"
        bad, n = [f"{s.path.name} ({s.reason})" for s in skipped], len(subset)
        views = [resize_and_crop(img, size) for img in images]
    else:
        calibration = Path(calibration)
        if not calibration.is_dir():
            raise EdgetuneError(f"--calib {calibration} is not a folder: pass a folder of images (subfolders are fine).")
        files, where = list_images(calibration), f"--calib {calibration}"
        if len(files) > limit:
            files = [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]
        views, paths, n = [], [], len(files)
        for p in files:
            try:
                views.append(model_input(p, size))
                paths.append(p)
            except ImageReadError as e:
                bad.append(f"{p.name} ({e.reason})")
    if not views:
        detail = f": {', '.join(bad[:3])}" if bad else ""
        raise EdgetuneError(
            f"No readable calibration images in {where} ({n} files{detail}). "
            "Pass --calib with a folder of real JPEG/PNG images."
        )
    if bad:
        logger.warning("Skipped %d unreadable calibration images: %s", len(bad), ", ".join(bad[:5]))
    return to_nchw_float(np.stack(views)), paths


def _note_backbone_mismatch(fmt: str, run: RunDir, inputs: np.ndarray, labels: np.ndarray,
                            exported: np.ndarray, ctx: ExportContext) -> None:
    """An fp32/fp16 export of a run whose head learned on an int8 backbone pairs that head with
    a backbone it never saw: measure what that costs against the run-dir model, say it, record it."""
    from exporters import parity

    pairing = parity.measure(parity.run_dir_logits(run, inputs), exported, labels, run.labels)
    ctx.extra["backbone_mismatch"] = {
        "trained_on": "int8 backbone", "exported_with": "float backbone", **pairing.to_json(),
    }
    logger.warning(
        "%s pairs the head with the float backbone, but this run trained its head on an int8 backbone: "
        "on %d val images this pairing scores %.2f%% against %.2f%% for the run you evaluated "
        "(agreement %.2f%%). Export openvino-int8 to ship the backbone it learned on.",
        fmt, pairing.n, 100 * pairing.export_accuracy, 100 * pairing.source_accuracy, 100 * pairing.agreement,
    )


def stratified_subset(labels: list[int], limit: int, *, per_class: int | None = None) -> list[int]:
    """Indices of at most `limit` items (and at most `per_class` of any class), as equal a share per
    class as the classes allow (a small class gives all it has, the rest goes to the others),
    spread evenly within each class; sorted."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    quota, left = {}, limit
    for n, c in sorted((len(v), c) for c, v in by_class.items()):  # smallest classes first
        quota[c] = min(n, per_class or n, left // max(1, len(by_class) - len(quota)))
        left -= quota[c]
    picks = []
    for c, items in by_class.items():
        if quota[c]:
            picks += [items[i] for i in np.linspace(0, len(items) - 1, quota[c]).round().astype(int)]
    return sorted(picks)


def _check_unchanged_by_embedding(runner, inputs: np.ndarray, exported: np.ndarray, ctx: ExportContext) -> None:
    """Embedding metadata re-serialises the model after the parity check: make sure that changed
    nothing, on the first batch of val inputs (cheap, and enough to catch a wrong file)."""
    n = min(len(inputs), ctx.static_batch or 8)
    again = run_batched(runner, inputs[:n], batch=ctx.static_batch)
    if not np.allclose(again, exported[:n], atol=1e-5, rtol=1e-5):
        raise EdgetuneError("Export failed: the model changed when its metadata was embedded; please report this.")


def _check_out_dir(out_dir: Path, run: RunDir) -> None:
    """Fail before any work when the output location cannot be a directory, or when writing it would
    replace something that is not an export: a finished export replaces its whole folder (so an
    earlier bundle of the same format is updated in place), and a folder of photos or a run chosen
    as --out by mistake would be deleted with it."""
    out_dir = Path(out_dir)
    for parent in [out_dir, *out_dir.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise EdgetuneError(f"Cannot write the export to {out_dir}: {parent} is a file. Pick another --out.")
            break
    out, source = out_dir.resolve(), Path(run.path).resolve()
    if out == source or out in source.parents:
        raise EdgetuneError(f"--out {out_dir} holds the run {run.path} itself, which an export would replace: "
                            "pick another --out (the default is RUN/exports/FORMAT).")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise EdgetuneError(f"--out {out_dir} is a folder that is not an edgetune export, and an export replaces its "
                            "whole folder: pick a new or empty --out.")
