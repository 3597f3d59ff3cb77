"""Run a trained or exported classifier: one Predictor for run dirs and every export bundle.

A bundle (a folder with manifest.json, written by `edgetune export`) runs on its own runtime,
ONNX Runtime or OpenVINO, without importing torch: this is the path a robot takes. A run directory
runs its frozen backbone on the OpenVINO feature engine plus the head as numpy, or, when the
backbone tail was fine-tuned, the whole classifier converted to OpenVINO.

Every predictor takes uint8 NHWC RGB views (toolkit.preprocess.model_input output) and returns
probabilities; `logits` gives the raw scores.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from toolkit.errors import EdgetuneError
from toolkit.preprocess import apply_correction, correction_table, model_input

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def to_nchw_float(views: np.ndarray) -> np.ndarray:
    """uint8 NHWC views -> float32 NCHW 0-255, the input every exported model takes."""
    return np.ascontiguousarray(np.asarray(views).transpose(0, 3, 1, 2), dtype=np.float32)


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """A static-shape model takes exactly `size` items: zero-pad a short batch (callers drop the
    padding's outputs)."""
    n = len(batch)
    if n >= size:
        return batch
    return np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])


def run_batched(run: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, *, batch: int | None,
                default: int = 32) -> np.ndarray:
    """`run` over `inputs` in batches; with a static `batch` the last one is padded. A
    `PipelinedInfer` takes them all at once: it batches them itself, several in flight."""
    if isinstance(run, PipelinedInfer):
        return run(inputs)
    b = batch or default
    out = []
    for i in range(0, len(inputs), b):
        chunk = inputs[i : i + b]
        out.append(np.asarray(run(pad_batch(chunk, b) if batch else chunk), dtype=np.float32)[: len(chunk)])
    return np.concatenate(out)


def per_thread_infer(compiled) -> Callable[[np.ndarray], np.ndarray]:
    """Run an OpenVINO compiled model from any number of threads: each calling thread gets its own
    infer request (one request's buffers would be shared, so two concurrent calls race)."""
    local = threading.local()

    def infer(x: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        return request.infer({0: x})[0].copy()

    return infer


def keep_in_flight(requests: list, jobs, done: Callable[[Any, Any, int], None], *, pad_to: int | None = None) -> None:
    """Start each (key, batch) of `jobs` on the OpenVINO infer `requests` in turn, so one batch per
    request is in flight, and call done(key, request, rows) as each finishes, in job order; a
    `pad_to` batch is zero-padded (done gets the real row count). Requests are waited on from this
    thread, never through AsyncInferQueue callbacks: a callback needs the GIL on an OpenVINO thread,
    and tearing down the compiled model then deadlocks (seen with OpenVINO 2026.4: ~CompiledModel
    joining a thread that waits for the GIL)."""
    pending: list[tuple[Any, int] | None] = [None] * len(requests)

    def collect(i: int) -> None:
        key, rows = pending[i]
        requests[i].wait()
        done(key, requests[i], rows)
        pending[i] = None

    started = 0
    for key, batch in jobs:
        i = started % len(requests)
        if pending[i] is not None:
            collect(i)
        pending[i] = (key, len(batch))
        requests[i].start_async({0: np.ascontiguousarray(pad_batch(batch, pad_to) if pad_to else batch)})
        started += 1
    for j in range(started, started + len(requests)):  # the last ones, oldest first
        if pending[j % len(requests)] is not None:
            collect(j % len(requests))


class PipelinedInfer:
    """inputs (N, ...) -> outputs (N, ...) of an OpenVINO compiled model, in batches with one infer
    request per stream the compiled model asks for (OPTIMAL_NUMBER_OF_INFER_REQUESTS) in flight.
    One synchronous request runs one stream: under the THROUGHPUT hint that is half of a 2-core CPU.
    For bulk work (export checks, feature memories); one caller at a time. `outputs`: the ports
    whose results are concatenated along axis 1 (default: the first output)."""

    def __init__(self, compiled, *, static_batch: int | None = None, chunk: int = 32, outputs=None) -> None:
        from devices.openvino_compile import optimal_requests

        self.batch, self.pad_to = static_batch or chunk, static_batch
        self.ports = list(outputs) if outputs else [compiled.output(0)]
        self.requests = [compiled.create_infer_request() for _ in range(optimal_requests(compiled))]

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        results: list[np.ndarray] = []

        def done(_, request, rows: int) -> None:  # keep_in_flight calls back in job order
            results.append(np.concatenate([np.array(request.get_tensor(p).data[:rows], np.float32)
                                           for p in self.ports], axis=1))

        jobs = ((None, inputs[i : i + self.batch]) for i in range(0, len(inputs), self.batch))
        keep_in_flight(self.requests, jobs, done, pad_to=self.pad_to)
        return np.concatenate(results)


class Predictor:
    """A classifier ready to run: `labels`, `input_size`, `preprocess`, `predict`, `logits`.

    Thread-safe: any number of threads may call one Predictor (OpenVINO models keep one infer
    request per calling thread; ONNX Runtime sessions are safe to share).
    """

    def __init__(self, labels: list[str], input_size: int, run_logits: Callable[[np.ndarray], np.ndarray],
                 description: str, *, static_batch: int | None = None, info: dict[str, Any] | None = None,
                 camera_correction: dict[str, Any] | None = None) -> None:
        self.labels = list(labels)
        self.input_size = int(input_size)
        self._run = run_logits  # uint8 NHWC batch of any size -> float32 logits
        self._description = description
        self.static_batch = static_batch
        self.info = info or {}
        self.correction = correction_table(camera_correction)  # (256, 3) uint8 or None

    def preprocess(self, image, *, rgb: bool = True) -> np.ndarray:
        """An image file, or an RGB array of any size (BGR with rgb=False) -> the model's uint8 view.

        The one preprocessing (toolkit.preprocess.model_input) that training and export used, then,
        for a run adapted to a new camera, its camera correction.
        """
        return apply_correction(model_input(image, self.input_size, rgb=rgb), self.correction)

    def logits(self, views: np.ndarray) -> np.ndarray:
        views = np.asarray(views)
        if views.ndim == 3:
            views = views[None]
        if views.shape[1:] != (self.input_size, self.input_size, 3):
            raise EdgetuneError(
                f"Expected views of shape (N, {self.input_size}, {self.input_size}, 3), got {views.shape}: "
                "pass images through predictor.preprocess first."
            )
        if not self.static_batch:
            return np.asarray(self._run(views), dtype=np.float32)
        if not len(views):
            return np.zeros((0, len(self.labels)), np.float32)
        return run_batched(self._run, views, batch=self.static_batch)

    def predict(self, views: np.ndarray) -> np.ndarray:
        """Probabilities (N, C) for uint8 NHWC views."""
        return softmax(self.logits(views))

    def describe(self) -> str:
        return self._description


def load_predictor(path: Path, *, device: str = "auto") -> Predictor:
    """A Predictor for a bundle dir (manifest.json), a model file inside one, or a run dir."""
    path = Path(path)
    if path.is_file() and (path.parent / MANIFEST).is_file():
        path = path.parent
    if (path / MANIFEST).is_file():
        return _bundle_predictor(path, device)
    if (path / "config.json").is_file():
        return _run_predictor(path, device)
    if not path.exists():
        raise EdgetuneError(f"{path} does not exist: pass a run directory or an export bundle.")
    raise EdgetuneError(
        f"{path} is neither an edgetune run (config.json) nor an export bundle (manifest.json): "
        "pass the folder `edgetune train` or `edgetune export` wrote."
    )


# ------------------------------------------------------------------------------------- bundles


def read_manifest(bundle: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(bundle) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgetuneError(f"{Path(bundle) / MANIFEST} cannot be read ({e}): export the run again.") from None


def _pick_device(request: str, runtime: str):
    from devices import detect_devices, select_inference_device

    # Probe only the runtime this model needs: a bundle must never import torch.
    report = detect_devices(runtimes=(runtime,))
    return select_inference_device(request, report.devices, runtime=runtime)


def sha256_of(path: Path) -> str:
    """sha256 of a file, as a bundle's manifest records its model files."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_files(manifest: dict[str, Any]) -> list[str]:
    """The files that make a bundle's model: the ONNX file, or the IR's .xml and .bin."""
    model = manifest["model"]
    return [model, str(Path(model).with_suffix(".bin"))] if model.endswith(".xml") else [model]


def check_model_files(bundle: Path, manifest: dict[str, Any]) -> None:
    """Every model file is there with the sha256 its manifest records: an edited, corrupted or
    swapped model stops with one line before use (a damaged weights file otherwise predicts
    nonsense without an error). Hashing takes a few ms per MB."""
    for name in model_files(manifest):
        path = Path(bundle) / name
        if not path.is_file():
            raise EdgetuneError(f"{path} is missing: the bundle is incomplete; copy it again or re-export it.")
        expected = (manifest.get("sha256") or {}).get(name)
        if expected and sha256_of(path) != expected:
            raise EdgetuneError(f"{path} does not match its manifest (edited or corrupted): copy the bundle again.")


def _bundle_predictor(bundle: Path, device: str) -> Predictor:
    manifest = read_manifest(bundle)
    model = bundle / manifest["model"]
    check_model_files(bundle, manifest)
    runtime = manifest["runtime"]
    static = manifest["input"].get("batch")
    dev = _pick_device(device, runtime)
    name = dev.id.partition(":")[2]
    if runtime == "onnxruntime":
        run = onnx_runner(model, provider=name)
    elif runtime == "openvino":
        # LATENCY: robot code classifies frame by frame; a THROUGHPUT compile (several streams) doubles
        # batch-1 latency on small CPUs (BENCHMARKS.md "Runtime latency").
        run = openvino_runner(model, device=name, batch=static, latency=True)
    else:
        raise EdgetuneError(f"{bundle}: unknown runtime '{runtime}' in {MANIFEST}.")
    desc = f"{manifest['format']} bundle {bundle} on {dev.id} ({manifest.get('precision', '?')})"
    return Predictor(manifest["labels"], manifest["input"]["size"], lambda v: run(to_nchw_float(v)), desc,
                     static_batch=static, info={**manifest, "bundle_dir": str(bundle)},
                     camera_correction=manifest.get("preprocessing", {}).get("camera_correction"))


def onnx_runner(model: Path, *, provider: str = "CPUExecutionProvider") -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW -> logits with ONNX Runtime (the first graph output is the logits)."""
    from devices.ort_probe import import_onnxruntime

    ort = import_onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=[provider])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    return lambda x: session.run([output_name], {input_name: x})[0]


def openvino_runner(model: Path, *, device: str = "CPU", batch: int | None = None, latency: bool = False,
                    precise: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW -> logits with OpenVINO (IR or ONNX path).

    precise=True computes in fp32 on CPU: by default CPUs with AVX512-BF16/AMX run bf16, which moves
    logits by ~0.1 and would hide what the model file itself does (parity checks the file).
    latency=True: frame-by-frame use from any number of threads; otherwise bulk work, a
    `PipelinedInfer` (all streams busy; one caller at a time).
    """
    import openvino as ov

    from devices.openvino_compile import compile_model

    core = ov.Core()
    if precise and device.upper().startswith("CPU"):
        import openvino.properties.hint as hints

        core.set_property("CPU", {hints.inference_precision(): ov.Type.f32})
    compiled = compile_model(Path(model), device, batch=batch, latency=latency, core=core)
    return per_thread_infer(compiled) if latency else PipelinedInfer(compiled, static_batch=batch)


# ------------------------------------------------------------------------------------ run dirs


def _run_info(run) -> dict[str, Any]:
    """What a run's Predictor reports as `info`: its folder, and the calibration training fitted
    (temperature and unknown threshold, as a bundle's manifest holds them), so a run dir says
    "unknown" as its exports do."""
    return {"run_dir": str(run.path), "calibration": run.config.get("calibration")}


def _run_predictor(path: Path, device: str) -> Predictor:
    """A run directory on any runtime: OpenVINO by default, torch or ONNX Runtime when asked."""
    from toolkit.learners import INT8_BACKBONE
    from toolkit.runs import RunDir

    run = RunDir.open(path)
    spec, labels, cfg = run.spec, run.labels, run.config
    request = device.lower()
    runtime = ("onnxruntime" if request.startswith("ort:") else
               "openvino" if request == "auto" or request.startswith("openvino:") else "torch")
    dev = _pick_device(device, runtime)
    name = dev.id.partition(":")[2] if runtime != "torch" else dev.id
    if run.has_backbone_weights:
        return _finetuned_predictor(run, runtime, name, dev.id)
    from toolkit.features import create_engine

    int8 = run.int8_backbone  # raises when the run trained on one that is gone
    if int8 is not None and runtime == "openvino":
        engine = create_engine(spec.name, "openvino", name, precision="int8", ir=int8)
    else:
        engine = create_engine(spec.name, runtime, name)
        if int8 is not None:
            logger.warning("This run's head was trained on its int8 backbone (%s), which only OpenVINO runs: "
                           "%s runs the fp32 backbone, so predictions can differ from the evaluated run. "
                           "Use --device openvino:CPU (or auto) for the backbone it learned on.", INT8_BACKBONE, dev.id)
    head = run.numpy_head()
    trained = " trained on the int8 backbone" if int8 is not None else ""
    mismatch = ", NOT the int8 backbone the head trained on" if int8 is not None and engine.precision != "int8" else ""
    head_name = cfg.get("head_selection", {}).get("selected") or cfg["train"]["head"]
    desc = f"run {path} ({engine.name}{mismatch} + numpy {head_name} head{trained})"
    return Predictor(labels, spec.input_size, lambda v: head(engine.extract(np.ascontiguousarray(v))), desc,
                     info=_run_info(run), camera_correction=cfg.get("camera_correction"))


def _finetuned_predictor(run, runtime: str, name: str, device_id: str) -> Predictor:
    """The backbone's tail was fine-tuned: run the whole classifier (converted once for OpenVINO)."""
    spec = run.spec
    classifier = run.build_classifier()
    desc = f"run {run.path} (fine-tuned classifier) on {device_id}"
    if runtime == "torch":
        import torch

        classifier = classifier.to(name)

        def run_torch(v: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return classifier(torch.from_numpy(to_nchw_float(v)).to(name)).float().cpu().numpy()

        return Predictor(run.labels, spec.input_size, run_torch, desc, info=_run_info(run),
                         camera_correction=run.config.get("camera_correction"))
    if runtime != "openvino":
        raise EdgetuneError(f"A run with a fine-tuned backbone runs on OpenVINO or torch here, not {device_id}: "
                            "export it (`edgetune export RUN --format onnx`) for ONNX Runtime.")
    from devices.openvino_compile import compile_model
    from toolkit.convert import to_openvino

    infer = per_thread_infer(compile_model(to_openvino(classifier, spec.input_size), name))
    return Predictor(run.labels, spec.input_size, lambda v: infer(to_nchw_float(v)), desc, info=_run_info(run),
                     camera_correction=run.config.get("camera_correction"))
