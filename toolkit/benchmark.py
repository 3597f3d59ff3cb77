"""What a robot sees from a model: batch-1 latency on one request, and throughput with parallel requests.

Latency compiles the model for a fixed batch of 1 with the LATENCY hint and drives a single request
frame after frame, as robot code does. Throughput compiles with the THROUGHPUT hint and keeps as many
batch-1 requests in flight as the compiled model asks for (OPTIMAL_NUMBER_OF_INFER_REQUESTS), which
is what OpenVINO's benchmark_app does, so both figures can be set beside its figures on the same
file. Measuring latency on a model compiled for throughput (several streams, dynamic batch) reads
1.5-2x slower than the runtime really is on small CPUs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

WARMUP = 10


@dataclass
class Measurement:
    model: str
    description: str
    load_seconds: float
    latency_ms: list[float] = field(repr=False)
    throughput_img_s: float
    throughput_requests: int
    throughput_batch: int
    size_bytes: int

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latency_ms, q))

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "description": self.description,
            "load_seconds": round(self.load_seconds, 3),
            "latency_ms_p50": round(self.percentile(50), 3),
            "latency_ms_p90": round(self.percentile(90), 3),
            "latency_ms_p99": round(self.percentile(99), 3),
            "runs": len(self.latency_ms),
            "throughput_img_s": round(self.throughput_img_s, 1),
            "throughput_requests": self.throughput_requests,
            "throughput_batch": self.throughput_batch,
            "size_bytes": self.size_bytes,
        }


def time_calls(call: Callable[[], Any], runs: int, *, warmup: int = WARMUP) -> list[float]:
    """Milliseconds of `runs` back-to-back calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        call()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def synthetic_input(size: int, batch: int = 1) -> np.ndarray:
    # Bundles take float32 NCHW RGB 0-255 (normalisation is inside the graph).
    return np.random.default_rng(0).uniform(0, 255, (batch, 3, size, size)).astype(np.float32)


# ------------------------------------------------------------------------------------- OpenVINO


def _read_batch1(core, model: Path):
    from devices.openvino_compile import with_static_batch

    return with_static_batch(core.read_model(str(model)), 1)


def openvino_latency(model: Path, size: int, *, device: str = "CPU", runs: int = 100) -> list[float]:
    """Batch-1 latencies (ms) of one infer request on a LATENCY-compiled, batch-1 copy of `model`."""
    import openvino as ov

    from devices.openvino_compile import compile_model

    core = ov.Core()
    compiled = compile_model(_read_batch1(core, model), device, batch=1, latency=True, core=core)
    request = compiled.create_infer_request()
    x = synthetic_input(size)
    return time_calls(lambda: request.infer({0: x}), runs)


def openvino_throughput(model: Path, size: int, *, device: str = "CPU", seconds: float = 3.0) -> tuple[float, int]:
    """Images/s with the compiled model's optimal number of batch-1 requests in flight; (img/s, requests)."""
    import openvino as ov

    from devices.openvino_compile import compile_model, optimal_requests
    from devices.openvino_tuning import images_per_second

    core = ov.Core()
    compiled = compile_model(_read_batch1(core, model), device, batch=1, core=core)
    return images_per_second(compiled, lambda b: synthetic_input(size, b), 1, seconds), optimal_requests(compiled)


# --------------------------------------------------------------------------------- ONNX Runtime


def _session(model: Path, provider: str):
    from devices.ort_probe import import_onnxruntime

    ort = import_onnxruntime()

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=[provider])
    return session, session.get_inputs()[0].name, session.get_outputs()[0].name


def onnx_latency(model: Path, size: int, *, provider: str = "CPUExecutionProvider", runs: int = 100) -> list[float]:
    """Batch-1 latencies (ms) of session.run, the bare ONNX Runtime loop a robot would write."""
    session, inp, out = _session(model, provider)
    x = synthetic_input(size)
    return time_calls(lambda: session.run([out], {inp: x}), runs)


def onnx_throughput(model: Path, size: int, *, provider: str = "CPUExecutionProvider", batch: int = 8,
                    seconds: float = 3.0, static_batch: int | None = None) -> tuple[float, int]:
    """Images/s of batched session.run calls (ONNX Runtime parallelises inside one call); (img/s, batch)."""
    session, inp, out = _session(model, provider)
    batch = static_batch or batch
    x = synthetic_input(size, batch)
    session.run([out], {inp: x})
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run([out], {inp: x})
        done += batch
    return done / (time.perf_counter() - started), batch


# --------------------------------------------------------------------------------------- entry


def _bundle_files_size(path: Path, manifest: dict[str, Any] | None) -> int:
    """Bytes of the model itself (graph + weights): what a device loads, not the feature memory."""
    from toolkit.runtime import model_files

    files = [path / f for f in model_files(manifest)] if manifest else [path / "model.safetensors"]
    return int(sum(f.stat().st_size for f in files if f.is_file()))


def measure(path: Path, *, device: str = "auto", runs: int = 100, seconds: float = 3.0) -> Measurement:
    """Latency (LATENCY hint, one request, batch 1) and throughput of a bundle or a run directory."""
    from toolkit.runtime import MANIFEST, _pick_device, load_predictor, read_manifest

    path = Path(path)
    if path.is_file() and (path.parent / MANIFEST).is_file():
        path = path.parent
    t0 = time.perf_counter()
    predictor = load_predictor(path, device=device)  # validates the bundle/run and the device request
    load_s = time.perf_counter() - t0
    size = predictor.input_size
    if not (path / MANIFEST).is_file():
        return _measure_predictor(path, predictor, load_s, runs)
    manifest = read_manifest(path)
    model, runtime = path / manifest["model"], manifest["runtime"]
    name = _pick_device(device, runtime).id.partition(":")[2]
    if runtime == "openvino":
        lat = openvino_latency(model, size, device=name, runs=runs)
        tput, n = openvino_throughput(model, size, device=name, seconds=seconds)
        batch = 1
    else:
        lat = onnx_latency(model, size, provider=name, runs=runs)
        tput, batch = onnx_throughput(model, size, provider=name, seconds=seconds,
                                      static_batch=manifest["input"].get("batch"))
        n = 1
    desc = f"{predictor.describe()}; latency: 1 request, batch 1; throughput: {n} request(s), batch {batch}"
    return Measurement(str(path), desc, load_s, lat, tput, n, batch, _bundle_files_size(path, manifest))


def _measure_predictor(path: Path, predictor, load_s: float, runs: int) -> Measurement:
    """A run directory: the predictor `predict` uses (backbone engine + numpy head), batch 1 and batch 32."""
    rng = np.random.default_rng(0)
    size = predictor.input_size
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    lat = time_calls(lambda: predictor.logits(one), runs, warmup=5)
    batch = predictor.static_batch or 32
    many = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    predictor.logits(many)
    reps = max(2, min(10, runs // 10))
    t = time.perf_counter()
    for _ in range(reps):
        predictor.logits(many)
    tput = reps * batch / (time.perf_counter() - t)
    return Measurement(str(path), predictor.describe(), load_s, lat, tput, 1, batch, _bundle_files_size(path, None))
