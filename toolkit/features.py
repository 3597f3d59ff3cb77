"""The frozen backbone as a feature engine, and the pipeline that feeds it augmented views.

The backbone never needs gradients, so it runs on the fastest inference engine the machine has
(OpenVINO here: ~25x eager torch on 2 CPU cores) while OpenCV builds the next batches of views in
worker threads (cv2 and OpenVINO both release the GIL). Engines take uint8 NHWC RGB batches at the
backbone's input size and return float32 (N, feature_dim).
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from toolkit import __version__
from toolkit.backbones import BackboneSpec, create_backbone, get_spec
from toolkit.runtime import keep_in_flight, pad_batch, per_thread_infer, to_nchw_float

logger = logging.getLogger(__name__)

# Small batches keep activations in cache and memory flat. Engines without their own measurement
# (torch, ONNX Runtime, NPUs) use this; OpenVINO on CPU/GPU picks its batch by timing candidates.
DEFAULT_BATCH = 4


def cache_dir() -> Path:
    """Per-user cache for converted backbones (never inside a run: runs stay small)."""
    from devices.openvino_compile import edgetune_cache_dir

    return edgetune_cache_dir()


class FeatureEngine(abc.ABC):
    """Runs a frozen backbone. Subclasses set `runtime`, `device` and implement `_run`."""

    runtime = "?"
    static_batch: int | None = None  # NPUs compile for one batch size: shorter batches are padded
    batch = DEFAULT_BATCH  # images per engine call; OpenVINO measures its own (devices.openvino_tuning)

    def __init__(self, spec: BackboneSpec, device: str, precision: str) -> None:
        self.spec, self.device, self.precision = spec, device, precision

    compute = "fp32"  # what the device really computes in (OpenVINO may pick bf16 on the CPU)

    @property
    def name(self) -> str:
        compute = "" if self.compute == self.precision else f", {self.compute} compute"
        return f"{self.spec.name} on {self.runtime}:{self.device} ({self.precision}{compute})"

    def extract(self, batch: np.ndarray) -> np.ndarray:
        if self.static_batch:
            return self._run(pad_batch(batch, self.static_batch))[: len(batch)]
        return self._run(batch)

    @abc.abstractmethod
    def _run(self, batch: np.ndarray) -> np.ndarray:
        """Features for one batch of exactly the engine's batch size (if static)."""

    def extract_many(self, batches, out: np.ndarray) -> None:
        """Consume (offset, batch) pairs into `out`. Engines with async queues override this."""
        for offset, batch in batches:
            out[offset : offset + len(batch)] = self.extract(batch)


class TorchEngine(FeatureEngine):
    runtime = "torch"

    def __init__(self, spec: BackboneSpec, device: str = "cpu", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        import torch

        from toolkit.convert import with_normalization

        self._torch = torch
        self.model = with_normalization(create_backbone(spec.name), spec).to(device)
        if str(device).startswith("cuda"):
            # A GPU idles on 4 images a call: the CPU-side view building is the limit there.
            self.batch = 32

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(to_nchw_float(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()


class OpenVINOEngine(FeatureEngine):
    runtime = "openvino"

    def __init__(
        self,
        spec: BackboneSpec,
        device: str = "CPU",
        precision: str = "fp32",
        *,
        calibration: Sequence[np.ndarray] | None = None,
        batch: int | None = None,
        ir: Path | Any | None = None,
    ) -> None:
        super().__init__(spec, device, precision)
        import openvino as ov

        from devices.openvino_compile import compile_model, needs_static_shapes

        if isinstance(ir, ov.Model):
            model = float_input(ir)
        elif ir is not None:
            model = float_input(ov.Core().read_model(str(ir)))
        else:
            model = _openvino_backbone(spec, precision, calibration)
        # What `save_ir` keeps with a run: float NCHW in, as every exporter expects. A copy, because
        # PrePostProcessor.build() changes the model in place (runs saved before this fix hold
        # the uint8 form; `float_input` undoes it on load).
        self.model = model.clone()
        # Take uint8 NHWC straight from OpenCV; the layout change and cast run inside OpenVINO.
        ppp = ov.preprocess.PrePostProcessor(model)
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        model = ppp.build()
        if needs_static_shapes(device):
            # Every batch size is another compile on an NPU: take the fixed one rather than tune.
            self.static_batch = self.batch = batch or DEFAULT_BATCH
            self.compiled = compile_model(model, device, batch=self.static_batch)
        else:
            self.compiled = self._tuned_compile(model, device, precision, batch)
        self._infer = per_thread_infer(self.compiled)  # a run-dir Predictor may be called from many threads
        compute = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.compute = {"bf16": "bf16", "f16": "fp16"}.get(compute, self.compute)
        if precision == "int8":
            self.compute = "int8"

    def _tuned_compile(self, model, device: str, precision: str, batch: int | None):
        """Compile with the hint and batch size measured fastest for this model on this machine."""
        from devices.openvino_compile import compile_model
        from devices.openvino_tuning import tuned_settings

        size = self.spec.input_size
        rng = np.random.default_rng(0)
        compiled = {}

        def compile_for(hint: str):
            compiled[hint] = compile_model(model, device, latency=hint == "LATENCY")
            return compiled[hint]

        settings = tuned_settings(
            f"{device} | {self.spec.name} {precision}", compile_for,
            lambda n: rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
        self.batch = batch or settings.batch
        self.tuning = settings
        return compiled.get(settings.hint) or compile_for(settings.hint)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self._infer(np.ascontiguousarray(batch))

    def extract_many(self, batches, out: np.ndarray) -> None:
        from devices.openvino_compile import optimal_requests

        def done(offset: int, request, rows: int) -> None:
            out[offset : offset + rows] = request.get_output_tensor(0).data[:rows]

        # One infer request per stream keeps every core busy while Python builds the next batch.
        requests = [self.compiled.create_infer_request() for _ in range(optimal_requests(self.compiled))]
        keep_in_flight(requests, batches, done, pad_to=self.static_batch)


class ONNXRuntimeEngine(FeatureEngine):
    runtime = "onnxruntime"

    def __init__(self, spec: BackboneSpec, device: str = "CPUExecutionProvider", precision: str = "fp32") -> None:
        super().__init__(spec, device, precision)
        from devices.ort_probe import import_onnxruntime

        ort = import_onnxruntime()

        path = cached_onnx_backbone(spec)
        self.session = ort.InferenceSession(str(path), providers=[device])
        self.input_name = self.session.get_inputs()[0].name

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: to_nchw_float(batch)})[0]


ENGINES: dict[str, type[FeatureEngine]] = {
    "torch": TorchEngine,
    "openvino": OpenVINOEngine,
    "onnxruntime": ONNXRuntimeEngine,
}


def create_engine(
    backbone: str,
    runtime: str = "openvino",
    device: str = "CPU",
    *,
    precision: str = "fp32",
    calibration: Sequence[np.ndarray] | None = None,
    ir: Path | Any | None = None,
) -> FeatureEngine:
    """Build the feature engine for `backbone` on `runtime`/`device`.

    precision "int8" (OpenVINO only) quantizes the backbone with NNCF on `calibration` views, so
    the head learns on the same int8 features an int8 export will produce. `ir` (an IR path or an
    openvino.Model) is an already converted (or quantized) OpenVINO backbone to run instead, e.g.
    the one a run trained on.
    """
    spec = get_spec(backbone)
    if precision not in ("fp32", "fp16", "int8"):
        from toolkit.errors import EdgetuneError

        raise EdgetuneError(f"Unknown backbone precision '{precision}'. Use fp32, fp16 or int8.")
    if runtime == "openvino":
        return OpenVINOEngine(spec, device, precision, calibration=calibration, ir=ir)
    if precision != "fp32":
        from toolkit.errors import EdgetuneError

        raise EdgetuneError(
            f"Backbone precision {precision} needs the OpenVINO engine; {runtime} runs fp32."
        )
    return ENGINES[runtime](spec, device)


def weights_version(spec: BackboneSpec) -> str:
    """The installed version of the weights package: a new release must not reuse a backbone
    converted from the old weights, so it is part of every cache key."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(spec.weights)
    except PackageNotFoundError:
        return "unversioned"


def backbone_cache_key(spec: BackboneSpec, converter: str) -> str:
    """Name of a converted backbone in the cache: what it was converted from and with."""
    return f"{spec.name}-w{weights_version(spec)}-{__version__}-{converter}"


def float_input(model):
    """`model` with a float32 NCHW input: a backbone saved with its uint8 NHWC preprocessing
    (Parameter -> Convert/Transpose) has that prefix replaced by a float NCHW parameter."""
    import openvino as ov

    param = model.get_parameters()[0]
    if param.get_element_type() != ov.Type.u8:
        return model
    out = param.output(0)
    while True:  # follow the Convert/Transpose chain the PrePostProcessor inserted
        nxt = [t.get_node() for t in out.get_target_inputs()]
        if len(nxt) != 1 or nxt[0].get_type_name() not in ("Convert", "Transpose"):
            break
        out = nxt[0].output(0)
    shape = out.get_partial_shape()
    new = ov.opset13.parameter(shape, ov.Type.f32, name=param.get_friendly_name())
    new.output(0).set_names(param.output(0).get_names())
    for target in list(out.get_target_inputs()):
        target.replace_source_output(new.output(0))
    return ov.Model(model.get_results(), [new], model.get_friendly_name())


def _openvino_backbone(spec: BackboneSpec, precision: str, calibration):
    """The backbone as an openvino.Model, converted once per version and cached on disk."""
    import openvino as ov

    core = ov.Core()
    key = backbone_cache_key(spec, f"ov{ov.__version__.split('-')[0]}")
    path = cache_dir() / "openvino" / f"{key}.xml"
    if path.exists():
        model = core.read_model(str(path))
    else:
        from toolkit.convert import save_ir, to_openvino, with_normalization

        model = to_openvino(with_normalization(create_backbone(spec.name), spec), spec.input_size)
        save_ir(model, path)
    if precision == "fp16":
        # The CPU plugin computes in fp32 (or bf16) anyway; fp16 matters for GPU/NPU devices,
        # which pick it up through INFERENCE_PRECISION_HINT in devices.openvino_compile.
        return model
    if precision == "int8":
        if calibration is None:
            return core.read_model(str(cached_int8_backbone(spec, model)))
        return _quantize_backbone(model, calibration)
    return model


def _quantize_backbone(model, calibration):
    if not calibration:
        from toolkit.errors import EdgetuneError

        raise EdgetuneError("int8 backbone needs calibration images (the training set's clean views).")
    logger.info("Quantizing the backbone to int8 with NNCF on %d views", len(calibration))
    return backbone_int8(model, [to_nchw_float(v[None]) for v in calibration])


def backbone_int8(model, batches: Sequence[np.ndarray], *, float_ops: Sequence[str] = (), **nncf_options):
    """int8 as edgetune ships it, for the training backbone and openvino-int8 exports: `nncf_int8`
    with every depthwise convolution and the leading convolutions (`leading_convolutions`) reading
    float inputs (and the op types in `float_ops`, an export's head, left in float).

    Per-tensor int8 inputs to the depthwise layers (one 3x3 or 5x5 filter per channel) are where
    Lite1's int8 features part from fp32; those layers hold 9.5% of its multiply-adds. With their
    inputs in float, the centred cosine to fp32 features on the training images went 0.928 -> 0.984
    (ants/bees) and 0.920 -> 0.983 (caltech50), at no measurable cost in throughput (oneDNN held to
    AVX2; BENCHMARKS.md "int8 training backbone: layers"), and an exported head agreed with its fp32
    self on more held-out training images ("int8 calibration methods"). Their weights stay int8
    (per channel, weight-only: `_int8_weights`), so the file is no larger than with every layer int8.

    Then the layers that see the image at full detail: on 96-px photos (a small camera's) the stem
    and first two blocks were where the rest of the loss sat (cosine with each set's own calibration:
    ants/bees 0.986 -> 0.992, caltech50 0.985 -> 0.992, 96-px ants/bees 0.973 -> 0.986, in grey
    0.956 -> 0.977), for 8.4% of the multiply-adds and 2% of the throughput (BENCHMARKS.md "int8 on
    kinds of photos nobody tuned for"). Their weights (5k values) stay float."""
    from toolkit.convert import load_nncf

    scope = load_nncf().IgnoredScope(names=leading_convolutions(model), types=["GroupConvolution", *float_ops],
                                     validate=False)
    return _int8_weights(nncf_int8(model, batches, ignored_scope=scope, **nncf_options), "GroupConvolution")


# The stem and the first two blocks of every EfficientNet-Lite: stem, block 0's projection (its
# expansion ratio is 1) and block 1's expansion and projection; their depthwise layers are
# GroupConvolutions, counted apart.
LEADING_CONVOLUTIONS = 4


def leading_convolutions(model) -> list[str]:
    """Names of the first LEADING_CONVOLUTIONS (non-depthwise) convolutions of an openvino.Model."""
    convs = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"]
    return convs[:LEADING_CONVOLUTIONS]


def _int8_weights(model, op_type: str):
    """Store the float weights of every `op_type` node as symmetric per-output-channel int8 with a
    float scale (exporters.head_weights' int8 rows, which OpenVINO folds back to float weights when
    compiling)."""
    from exporters.head_weights import int8_rows, openvino_int8_weight

    for op in model.get_ordered_ops():
        weights = op.input_value(1).get_node() if op.get_type_name() == op_type else None
        if weights is None or weights.get_type_name() != "Constant":
            continue
        w = weights.get_data().astype(np.float32)
        q, scale = int8_rows(w.reshape(len(w), -1))
        per_channel = (-1,) + (1,) * (w.ndim - 1)
        weight = openvino_int8_weight(q.reshape(w.shape), scale.reshape(per_channel), weights.get_friendly_name())
        op.input(1).replace_source_output(weight.output(0))
    return model


# What the cached int8 backbone was made with: a change to its quantization settings or to
# calibration_views must bump it, so no machine keeps a backbone the current recipe would not make.
INT8_RECIPE = "tabletop300-v4"  # v2: 7-bit weights in every layer; v3: float inputs to depthwise layers;
# v4: and to the stem and first two blocks
CALIBRATION_VIEWS = 300
FIDELITY_PROBES = 64


def calibration_views(size: int, count: int | None = None, *, seed: int = 0) -> list[np.ndarray]:
    """`count` generated photo-like scenes (toolkit.synthetic: textured surfaces, lit objects,
    shadows, sensor noise, JPEG) as eval views: int8 ranges that do not depend on whose data
    happens to be trained first on a machine, with no image files to ship."""
    import cv2

    from toolkit.preprocess import eval_view
    from toolkit.synthetic import DEMO_CLASSES, render_object

    views = []
    for i in range(CALIBRATION_VIEWS if count is None else count):
        rng = np.random.default_rng([seed, 104729, i])
        img = render_object(DEMO_CLASSES[i % len(DEMO_CLASSES)], rng, 288)
        # The JPEG round trip every real photo has been through (blocking, ringing).
        _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
        views.append(eval_view(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), size))
    return views


def int8_cache_path(spec: BackboneSpec) -> Path:
    """Where this machine keeps `spec`'s int8 backbone: one per weights, OpenVINO, NNCF and recipe version."""
    from importlib.metadata import version  # not nncf.__version__: importing NNCF takes 0.7 s

    import openvino as ov

    converter = f"ov{ov.__version__.split('-')[0]}-nncf{version('nncf')}-{INT8_RECIPE}"
    return cache_dir() / "openvino" / f"{backbone_cache_key(spec, converter)}-int8.xml"


def cached_int8_backbone(spec: BackboneSpec, model=None) -> Path:
    """The int8 backbone of `spec` on this machine: quantized with NNCF on `calibration_views`
    the first time any run asks for it (tens of seconds), read from the user cache after that.

    Concurrent runs wait on a lock file instead of quantizing twice; the IR is written atomically,
    after its record (`int8_backbone_record`), so a reader that sees the .xml sees everything.
    """
    path = int8_cache_path(spec)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_suffix(".lock")):
        if path.is_file():  # another process made it while this one waited
            return path
        import time

        from toolkit import atomic
        from toolkit.convert import save_ir

        if model is None:
            model = _openvino_backbone(spec, "fp32", None)
        t0 = time.perf_counter()
        views = calibration_views(spec.input_size)
        logger.info("Quantizing %s to int8 once for this machine (NNCF on %d generated views; cached in %s)",
                    spec.name, len(views), path.parent)
        quantized = backbone_int8(model, [to_nchw_float(v[None]) for v in views])
        seconds = time.perf_counter() - t0
        record = {"backbone": spec.name, "recipe": INT8_RECIPE, "calibration": f"{len(views)} generated views",
                  "quantize_seconds": round(seconds, 1), **int8_fidelity(spec, model, quantized)}
        atomic.write_json(path.with_suffix(".json"), record)
        save_ir(quantized, path)
        return path


def int8_backbone_record(spec: BackboneSpec) -> dict:
    """What `cached_int8_backbone` measured when it made the backbone (fidelity, time); {} if none."""
    import json

    try:
        return json.loads(int8_cache_path(spec).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def int8_fidelity(spec: BackboneSpec, fp32_model, int8_model, count: int | None = None) -> dict:
    """How closely the int8 backbone's features follow fp32 on generated probe scenes (a seed the
    calibration never saw): the mean cosine between the two feature vectors of each image, after
    removing the probes' mean feature (raw post-ReLU features share a large common component that
    would hide errors)."""
    from devices.openvino_compile import compile_model

    count = count or FIDELITY_PROBES
    x = to_nchw_float(np.stack(calibration_views(spec.input_size, count, seed=1)))
    cos = centred_cosines(compile_model(fp32_model, "CPU")(x)[0], compile_model(int8_model, "CPU")(x)[0])
    return {"fidelity_probes": count, "feature_cosine": round(float(cos.mean()), 5),
            "feature_cosine_min": round(float(cos.min()), 5)}


def centred_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the cosine between two (N, D) feature sets after removing each set's mean row."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


class _exclusive:
    """An advisory lock on `path` held for the with-block (POSIX flock; elsewhere no lock, and at
    worst two processes quantize the same backbone, each replacing the file atomically)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock


def nncf_int8(model, batches: Sequence[np.ndarray], *, ignored_scope=None, **nncf_options):
    """NNCF post-training int8 of an openvino.Model on float NCHW `batches`, with the settings
    measured across ants/bees, caltech50 and 128-px caltech50 (benchmarks/bench_int8.py): the
    performance preset; fast bias correction (full bias correction gained on one set of three, at
    3-4x the time; none lost agreement on 4 of 6 sets for half the time); and 7-bit weights in
    every layer (`int8_advanced_parameters`). The training backbone and openvino-int8 exports call
    it through `backbone_int8`. `nncf_options` override nncf.quantize's arguments
    (benchmarks/bench_int8.py measures the alternatives with it)."""
    from toolkit.convert import nncf_session

    kwargs = {"fast_bias_correction": True, "advanced_parameters": int8_advanced_parameters(), **nncf_options}
    if ignored_scope is not None:
        kwargs["ignored_scope"] = ignored_scope
    with nncf_session() as nncf:
        return nncf.quantize(model, nncf.Dataset(list(batches)), subset_size=len(batches), **kwargs)


def int8_advanced_parameters():
    """7-bit weights in every layer (NNCF's overflow fix, not only the first layer, its default).

    x86 CPUs without VNNI (AVX2 and AVX-512 before Cascade Lake: many robot boards) multiply u8
    activations by s8 weights in pairs summed into int16, which saturates once two products near
    255 x 127 meet. With the first layer fixed alone, Lite1's int8 features on such a CPU followed
    fp32 with a centred cosine of 0.949 on caltech50 training images and a head agreed with its fp32
    self on 96.8% of held-out images; with every layer fixed 0.985 and 98.4%, the same figures a
    VNNI CPU gives the same file (VNNI never saturates; 8-bit weights there: 0.989 / 98.6%). The
    file a VNNI workstation exports runs on the robot's CPU with the accuracy checked at export."""
    from toolkit.convert import load_nncf

    nncf = load_nncf()
    return nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE)


def cached_onnx_backbone(spec: BackboneSpec) -> Path:
    """The fp32 backbone as ONNX (0-255 RGB in, features out), converted from torch once per
    machine; torch is imported only to convert it."""
    from importlib.metadata import version

    key = hashlib.sha1(backbone_cache_key(spec, f"torch{version('torch')}").encode()).hexdigest()[:12]
    path = cache_dir() / "onnx" / f"{spec.name}-{key}.onnx"
    if not path.exists():
        from toolkit.convert import to_onnx, with_normalization

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        to_onnx(with_normalization(create_backbone(spec.name), spec), tmp, spec.input_size)
        os.replace(tmp, path)
    return path


def imagenet_prior(spec: BackboneSpec):
    """The backbone's own pretrained (ImageNet) classifier as a toolkit.head_fit.Prior, for the
    "prior" head: read from the weights package once per machine (torch) and cached as .npz, so
    later runs load it without torch. None where it cannot be had (no torch and no cache, a backbone
    without a classifier): the heads that need it are then left out, and say why at -v."""
    from toolkit.head_fit import Prior

    path = cache_dir() / "prior" / f"{spec.name}-{hashlib.sha1(backbone_cache_key(spec, 'classifier').encode()).hexdigest()[:12]}.npz"
    if not path.exists():
        try:
            import torch

            model = create_backbone(spec.name, with_classifier=True)
        except Exception as e:  # noqa: BLE001 - any reason means "no prior here", never a failed run
            logger.info("No pretrained classifier for %s (%s): the prior head is not a candidate.", spec.name, e)
            return None
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        if not linear or linear[-1].in_features != spec.feature_dim:
            return None
        from toolkit import atomic

        with atomic.open_for_write(path) as f:
            np.savez(f, weight=linear[-1].weight.detach().numpy(), bias=linear[-1].bias.detach().numpy())
    with np.load(path) as z:
        return Prior(z["weight"].astype(np.float32), z["bias"].astype(np.float32))


def batches_ahead(workers: int) -> int:
    """Batches `extract_features` builds ahead of the engine: bounded, so memory stays flat."""
    return max(2, workers * 2)


def stream_capacity(batch: int, views: int, workers: int) -> int:
    """Decoded images an ImageStream must keep so that `extract_features` over `views` consecutive
    views per image decodes each image once. An image's views may straddle two batches built by
    two threads; between its first and last view only batches within batches_ahead of those two
    are built, each spanning at most batch/views + 1 images: a cache that size decodes every image
    once, whatever the thread timing, and holds a few dozen images at most. Without repeated
    views one will do."""
    return (2 * batches_ahead(workers) + 2) * (-(-batch // views) + 1) if views > 1 else 1


def extract_features(
    engine: FeatureEngine,
    make_view: Callable[[int], np.ndarray],
    count: int,
    *,
    batch_size: int | None = None,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Features for views 0..count-1, where `make_view(k)` returns view k as uint8 HxWx3.

    Views are built in worker threads a few batches ahead of the engine. Each view's randomness
    must come from `k` alone (not from thread timing) so the result is the same on every run.
    Returns float16 (count, feature_dim): half the memory, and plenty for a linear head. Each
    batch is cast as it lands, so no float32 copy of all the features ever exists.
    """
    batch_size = batch_size or engine.batch
    out = np.empty((count, engine.spec.feature_dim), np.float16)
    starts = range(0, count, batch_size)

    def build(start: int) -> np.ndarray:
        return np.stack([make_view(k) for k in range(start, min(start + batch_size, count))])

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def batches():
            ahead = batches_ahead(workers)
            pending = [pool.submit(build, s) for s in starts[:ahead]]
            for i, s in enumerate(starts):
                batch = pending[i].result()
                pending[i] = None  # free the batch once handed over
                if i + ahead < len(starts):
                    pending.append(pool.submit(build, starts[i + ahead]))
                yield s, batch
                if progress:
                    progress(min(s + batch_size, count))

        engine.extract_many(batches(), out)
    return out
