"""ONNX int8: static QDQ quantization with onnxruntime.quantization, per-channel weights.

The fp32 graph is first run through quant_pre_process (shape inference + graph optimisation, as
ORT recommends), then calibrated (MinMax, measured best against percentile and entropy in
BENCHMARKS.md) on a class-stratified subset of the run's training images (or --calib). Two weight
fixes make the result hold on every dataset and CPU (`weight_overrides`): int32-safe biases and
7-bit first-layer weights. The head (Gemm) and softmax compute in float: a sliver of the compute,
and int8 logits would round near-ties; the head's weights are stored compressed
(exporters.head_weights). The other recipe is NNCF's on the same ONNX graph (fast bias correction,
7-bit weights, per-tensor activations): it goes first on x86 CPUs without int8 dot-product units
(`nncf_first`), where it agreed with fp32 more often than ORT's quantizer on both visible sets
(BENCHMARKS.md "int8 on a plain AVX2 CPU"). When the first misses the accuracy budget the other is
tried, then NNCF's accuracy-controlled quantization, which keeps the layers that cost most in fp32.
NNCF's graphs are rewritten into the layout onnxruntime fuses (`ort_layout`): as NNCF writes them,
ORT runs every convolution in float.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from exporters import register
from exporters.base import ExportContext, Exporter
from exporters.head_weights import compress_onnx_head
from exporters.onnx_fp32 import write_onnx
from exporters.openvino_ir import head_scope
from toolkit.convert import nncf_session
from toolkit.runs import RunDir

logger = logging.getLogger(__name__)


def _reader(inputs: np.ndarray, input_name: str, batch: int):
    """Batches of `inputs`; len() and set_range() (in batches) let quantize_static calibrate in strides."""
    from onnxruntime.quantization import CalibrationDataReader

    starts = list(range(0, len(inputs), batch))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.set_range(0, len(starts))

        def __len__(self):
            return len(starts)

        def set_range(self, start_index: int, end_index: int):
            self._it = iter(starts[start_index:end_index])

        def get_next(self):
            i = next(self._it, None)
            if i is None:
                return None
            chunk = inputs[i : i + batch]
            if len(chunk) < batch:  # a static-shape graph takes full batches only
                chunk = np.concatenate([chunk, inputs[: batch - len(chunk)]])
            return {input_name: chunk}

    return Reader()


def _stride(n_batches: int, most: int = 4) -> int:
    """Batches per calibration stride: the largest divisor of n_batches up to `most` (ORT requires a divisor)."""
    return max(k for k in range(1, most + 1) if n_batches % k == 0)


def calibrate(prep: Path, calib: np.ndarray, *, batch: int, method: str = "MinMax"):
    """Activation ranges (onnxruntime TensorsData) of every quantizable tensor over `calib`.

    MinMax (the default) runs ORT's own augmented calibration graph on OpenVINO (`_minmax_ranges`);
    the histogram methods (Percentile, Entropy; measured in BENCHMARKS.md) run ORT's calibrator,
    a few batches at a time, merging ranges between strides, as they hold every activation of
    every batch. Not CalibMaxIntermediateOutputs: in ORT 1.19 it drops the held outputs without
    folding them into the ranges (microsoft/onnxruntime#18893).
    """
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if method == "MinMax":
        return _minmax_ranges(Path(prep), calib, batch)
    with tempfile.TemporaryDirectory(prefix="ort.calib.") as tmp:
        calibrator = create_calibrator(
            Path(prep), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod[method],
        )
        reader = _reader(calib, calibrator.model.graph.input[0].name, batch)
        stride = _stride(len(reader))
        for start in range(0, len(reader), stride):
            reader.set_range(start, start + stride)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        del calibrator
    return ranges


def _minmax_ranges(prep: Path, calib: np.ndarray, batch: int):
    """ORT's MinMax ranges (min of the per-batch minima, max of the maxima; asymmetric, no moving
    average: ORT's defaults), computed by running ORT's augmented graph (a ReduceMin and a
    ReduceMax after every tensor it will quantize) on OpenVINO in fp32. ORT runs that graph with
    every graph optimisation turned off: ~2.8x the CPU time per image of OpenVINO here, which
    made calibration most of an onnx-int8 export. The ranges equal ORT's to float rounding (test)."""
    import onnx
    import openvino as ov
    import openvino.properties.hint as hints
    from onnxruntime.quantization.calibrate import CalibrationMethod, MinMaxCalibrater, TensorData, TensorsData

    with tempfile.TemporaryDirectory(prefix="ort.calib.") as tmp:
        augmented = Path(tmp) / "augmented.onnx"
        MinMaxCalibrater(prep, None, str(augmented)).augment_graph()  # no ORT session: OpenVINO runs it
        graph = onnx.load(str(augmented), load_external_data=False).graph
        reduced = [o.name for o in graph.output if o.name.endswith(("_ReduceMin", "_ReduceMax"))]
        core = ov.Core()
        core.set_property("CPU", {hints.inference_precision(): ov.Type.f32})  # bf16 CPUs would widen ranges
        compiled = core.compile_model(core.read_model(str(augmented)), "CPU")
    request = compiled.create_infer_request()
    ports = {name: compiled.output(name) for name in reduced}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for i in range(0, len(calib), batch):
        chunk = calib[i : i + batch]
        if len(chunk) < batch:  # a static-shape graph takes full batches only: repeat images (min/max unchanged)
            chunk = np.concatenate([chunk, np.resize(calib, (batch - len(chunk), *calib.shape[1:]))])
        result = request.infer({0: np.ascontiguousarray(chunk)})
        for name, port in ports.items():
            tensor, _, kind = name.rpartition("_")
            value = float(np.asarray(result[port]).reshape(-1)[0])
            if kind == "ReduceMin":
                lo[tensor] = min(lo.get(tensor, value), value)
            else:
                hi[tensor] = max(hi.get(tensor, value), value)
    return TensorsData(CalibrationMethod.MinMax, {
        t: TensorData(lowest=np.array([lo[t]], np.float32), highest=np.array([hi[t]], np.float32)) for t in lo})


def ort_layout(model) -> int:
    """Rewrite NNCF's QDQ ONNX graph (in place) into the layout onnxruntime fuses; returns the Conv
    biases it quantized. The numbers do not change, only their types:

    - Conv biases: NNCF keeps them float, and ORT's QDQ selector then leaves the Conv in float
      (DequantizeLinear -> Conv -> QuantizeLinear at 3-4x the fp32 graph's latency on a plain AVX2
      CPU). They become int32 with scale input_scale x weight_scale[c], as ORT writes them; a dead
      channel whose quotient would leave int32 gets a larger weight scale (`INT32_BIAS_LIMIT`,
      its tiny weights then round to 0), as `weight_overrides` does for ORT's own quantizer.
    - int8 activations: NNCF quantizes a tensor that can be negative (a projection's output, a
      residual sum) as int8, the ReLU6 outputs as uint8, and QLinearConv / QLinearAdd need one
      type in and out. Each int8 activation zero point z becomes uint8 z + 128: the same grid.

    The activations must be quantized per tensor (`nncf_onnx_parameters`): QLinearConv takes one
    input scale, so per-channel depthwise inputs (NNCF's default on CPU) cannot be fused at all.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name])

    def put(name: str, value: np.ndarray) -> None:
        if name not in inits:
            inits[name] = graph.initializer.add()
        inits[name].CopyFrom(numpy_helper.from_array(value, name))

    biases = []
    for conv in [n for n in graph.node if n.op_type == "Conv"]:
        x, w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if (len(conv.input) < 3 or conv.input[2] not in inits or x is None or w is None
                or x.op_type != "DequantizeLinear" or w.op_type != "DequantizeLinear" or w.input[0] not in inits):
            continue
        bias = array(conv.input[2]).astype(np.float64)
        x_scale = float(array(x.input[1]).reshape(-1)[0])
        w_scale = array(w.input[1]).astype(np.float64)
        shape = w_scale.shape
        w_scale = np.broadcast_to(w_scale.reshape(-1), bias.shape).copy()
        need = np.abs(bias) / (x_scale * INT32_BIAS_LIMIT)
        grow = need > w_scale
        if grow.any() and int(np.prod(shape)) == bias.size:  # requantize those channels' int8 weights on the larger scale
            q = array(w.input[0]).astype(np.float64)
            q[grow] = np.round(q[grow] * (w_scale[grow] / need[grow]).reshape(-1, *[1] * (q.ndim - 1)))
            w_scale[grow] = need[grow]
            put(w.input[0], q.astype(np.int8))
            put(w.input[1], w_scale.astype(np.float32).reshape(shape))
        name = conv.input[2]
        scale = (x_scale * w_scale).astype(np.float32)
        put(name + "_quantized", np.round(bias / scale.astype(np.float64)).astype(np.int32))
        put(name + "_scale", scale)
        put(name + "_zero_point", np.zeros(bias.shape, np.int32))
        biases.append(onnx.helper.make_node("DequantizeLinear", [name + "_quantized", name + "_scale", name + "_zero_point"],
                                            [name + "_dequantized"], name=name + "_DequantizeLinear", axis=0))
        conv.input[2] = name + "_dequantized"
    signed_outputs, shifted = set(), set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.input[0] in weights or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or (zp.data_type != onnx.TensorProto.INT8 and zp.name not in shifted):
            continue
        if node.op_type == "QuantizeLinear":
            signed_outputs.add(node.output[0])
        if zp.name not in shifted:
            put(zp.name, (array(zp.name).astype(np.int16) + 128).astype(np.uint8))
            shifted.add(zp.name)
    for info in graph.value_info:
        if info.name in signed_outputs:
            info.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    nodes = biases + list(graph.node)  # the new nodes read initializers only: first is topological
    del graph.node[:]
    graph.node.extend(nodes)
    return len(biases)


def nncf_onnx_parameters():
    """NNCF's int8 recipe (`int8_advanced_parameters`: 7-bit weights in every layer) with every
    activation quantized per tensor, so that `ort_layout` can hand onnxruntime a graph it fuses."""
    from toolkit.features import int8_advanced_parameters

    params = int8_advanced_parameters()  # imports NNCF without torch first
    from nncf.quantization.advanced_parameters import QuantizationParameters

    params.activations_quantization_params = QuantizationParameters(per_channel=False)
    return params


# A quantized bias is int32 with scale input_scale x weight_scale[c]. Keep every |q| below 2^30
# (half of int32's range) so rounding in ORT's own scale arithmetic can never reach the edge.
INT32_BIAS_LIMIT = float(2**30)


def weight_overrides(model, ranges, *, seven_bit: str = "first") -> dict[str, list[dict]]:
    """Per-channel weight scales (ORT TensorQuantOverrides) that fix two ways int8 goes wrong.

    int32-safe biases: ORT 1.19 quantizes a Conv bias as round(b / (input_scale x weight_scale[c]))
    cast to int32 without a range check. A "dead" output channel (max |w| = 3e-7 in
    EfficientNet-Lite's stem, bias -5.3) gets a tiny weight scale, the quotient is ~1e11 and the
    cast wraps it to -2^31: the bias changes value (positive ones flip sign), and a RuntimeWarning
    "invalid value encountered in cast" is the only sign. Such channels get the smallest weight
    scale that keeps the bias representable (their tiny weights then round to 0 or +-1, what they
    are worth next to the bias). ORT 1.20 added the same adjustment upstream.

    first-layer 7-bit weights: on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ORT's
    u8 x s8 kernels add pairs of products in int16 (vpmaddubsw), which saturates when both
    activations and weights use their full range: that is the stem, which sees raw pixels. The
    saturated stem alone costs ~2.6% top-1 agreement on ants/bees (the same graph run without
    fusion agrees 100%). Weights in [-64, 63] cannot saturate; NNCF's default overflow fix does the
    same for the first layer. Later layers see ReLU6 outputs and were measured not to need it.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in inits]
    overrides: dict[str, list[dict]] = {}
    for i, node in enumerate(convs):
        narrow = seven_bit == "all" or (seven_bit == "first" and i == 0)
        qmax = 63.5 if narrow else 127.0  # ORT's symmetric ranges: [-64, 64] reduced, [-127, 127] full
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        scale = np.abs(w.reshape(len(w), -1)).max(axis=1) / qmax
        if len(node.input) > 2 and node.input[2] in inits and node.input[0] in ranges.data:
            lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in ranges.data[node.input[0]].range_value)
            input_scale = (max(hi, 0.0) - min(lo, 0.0)) / 255.0  # uint8 activations, ORT's formula
            b = np.abs(numpy_helper.to_array(inits[node.input[2]]).astype(np.float64))
            if input_scale > 0:
                scale = np.maximum(scale, b / (input_scale * INT32_BIAS_LIMIT))
        if not narrow and np.array_equal(scale, np.abs(w.reshape(len(w), -1)).max(axis=1) / qmax):
            continue  # ORT's own scales are fine
        scale[scale == 0] = 1.0  # an all-zero channel with zero bias: any scale works; ORT uses 1
        overrides[node.input[1]] = [{"axis": 0, "scale": np.float32(s), "zero_point": np.int8(0)} for s in scale]
    return overrides


def quantize(prep: Path, out: Path, ranges, *, exclude: tuple[str, ...] = (), overrides: bool = True,
             seven_bit: str = "first", extra_options: dict | None = None) -> None:
    """Static QDQ int8 of the pre-processed graph `prep` with activation `ranges` (`calibrate`):
    per-channel int8 weights, uint8 activations; the head (Gemm/MatMul), softmax and the nodes
    named in `exclude` stay fp32."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    model = load_model_with_shape_infer(Path(prep))
    head = [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul", "Softmax")] + list(exclude)
    options = dict(extra_options or {})
    if overrides:
        options["TensorQuantOverrides"] = weight_overrides(model, ranges, seven_bit=seven_bit)
    quantizer = QDQQuantizer(
        model, True, False, QuantType.QInt8, QuantType.QUInt8, ranges,
        [], head, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)), options,  # quantize_static's defaults
    )
    quantizer.quantize_model()
    compress_onnx_head(quantizer.model.model)
    quantizer.model.save_model_to_file(str(out))


@register
class OnnxInt8Exporter(Exporter):
    name = "onnx-int8"
    runtime = "onnxruntime"
    precision = "int8"
    tolerance = None
    description = "ONNX int8 (QDQ, per-channel), for ORT CPU / NPU execution providers"

    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        if run.int8_backbone is not None:
            logger.warning(
                "This run trained its head on an OpenVINO int8 backbone, which has no ONNX form: onnx-int8 "
                "quantizes the backbone afresh with onnxruntime and is checked against the run-dir model. "
                "Export openvino-int8 to ship the exact backbone the head learned on."
            )
            ctx.extra["backbone_note"] = "re-quantized with onnxruntime (not the run's own int8 backbone)"
        return self.build_with_nncf(run, out_dir, ctx) if nncf_first() else self.build_with_ort(run, out_dir, ctx)

    def build_with_ort(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        """onnxruntime's own static quantization (MinMax calibration, `weight_overrides`)."""
        model = Path(out_dir) / "model.onnx"
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work.") as work:
            with ctx.stage("convert"):
                prep = preprocessed(run, Path(work), ctx)
            calib = ctx.calibration_inputs()
            with ctx.stage("calibrate"):
                ranges = calibrate(prep, calib, batch=ctx.static_batch or 8)
            with ctx.stage("quantize"):
                quantize(prep, model, ranges)
        ctx.extra["quantizer"] = ORT_QUANTIZER
        return model

    def build_with_accuracy_control(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        """NNCF's accuracy-controlled quantization on the ONNX graph: it ranks layers by what their
        quantization costs and reverts the worst to fp32 until the loss fits the budget."""
        import onnx

        from devices.ort_probe import import_onnxruntime
        from exporters.openvino_ir import agreement_check, batches, restorer_parameters

        ort = import_onnxruntime()

        model = Path(out_dir) / "model.onnx"
        calib = ctx.calibration_inputs()
        b = ctx.static_batch or 1
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work.") as work:
            graph = onnx.load(str(preprocessed(run, Path(work), ctx)))
        name = graph.graph.input[0].name

        sessions: dict[int, tuple] = {}  # one session per candidate model NNCF hands us (protobufs take no attributes)

        def run_model(candidate, x):
            if id(candidate) not in sessions:
                sessions.clear()  # NNCF validates one candidate at a time
                sessions[id(candidate)] = (candidate, ort.InferenceSession(candidate.SerializeToString(),
                                                                           providers=["CPUExecutionProvider"]))
            return sessions[id(candidate)][1].run(None, {name: x})[0]

        validation, metric, max_drop = agreement_check(calib, run, b, ctx, run_model)
        logger.info("onnx-int8: NNCF accuracy-controlled quantization, max agreement loss %.2f%%", 100 * max_drop)
        with nncf_session("exporters") as nncf:
            quantized = nncf.quantize_with_accuracy_control(
                graph, nncf.Dataset(batches(calib, b), lambda x: {name: x}),
                nncf.Dataset(validation, lambda item: {name: item[0]}), metric, max_drop=max_drop,
                drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
                ignored_scope=head_scope(onnx=True),
                advanced_accuracy_restorer_parameters=restorer_parameters(),
                advanced_quantization_parameters=nncf_onnx_parameters(),
            )
        _save_in_ort_layout(quantized, model)
        ctx.extra["quantizer"] = "nncf.quantize_with_accuracy_control"
        return model

    def build_with_nncf(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        """NNCF's post-training quantization (fast bias correction, 7-bit weights, per-tensor
        activations) of the same ONNX graph, rewritten into ORT's fused layout (`ort_layout`)."""
        import onnx

        from exporters.openvino_ir import batches

        model = Path(out_dir) / "model.onnx"
        calib = ctx.calibration_inputs()
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work.") as work:
            graph = onnx.load(str(preprocessed(run, Path(work), ctx)))
        name = graph.graph.input[0].name
        with nncf_session("exporters") as nncf:
            quantized = nncf.quantize(
                graph, nncf.Dataset(batches(calib, ctx.static_batch or 1), lambda x: {name: x}),
                subset_size=len(calib), advanced_parameters=nncf_onnx_parameters(),
                ignored_scope=head_scope(onnx=True))
        _save_in_ort_layout(quantized, model)
        ctx.extra["quantizer"] = NNCF_QUANTIZER
        return model

    def fallbacks(self):
        other = ("onnxruntime quantization", self.build_with_ort) if nncf_first() else \
            ("NNCF quantization", self.build_with_nncf)
        return [other, ("accuracy-controlled quantization", self.build_with_accuracy_control)]


ORT_QUANTIZER = "onnxruntime.quantization (QDQ)"
NNCF_QUANTIZER = "nncf.quantize (onnxruntime layout)"
# x86 int8 dot-product units. Without them ORT's u8 x s8 kernels run another code path (AVX2
# vpmaddubsw, int16 intermediates), where its own quantizer agreed with fp32 less often than NNCF's
# on both visible sets (BENCHMARKS.md "int8 on a plain AVX2 CPU").
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def nncf_first() -> bool:
    """Whether NNCF's recipe (in ORT's layout) is the first onnx-int8 try here, ORT's own the
    fallback: on x86 CPUs without int8 dot-product units. Elsewhere ORT's quantizer, the recipe
    measured best on AMX, goes first. The CPU's own flags: ONEDNN_MAX_CPU_ISA does not cap ORT."""
    from devices.probe import cpu_flags

    flags = cpu_flags(capped=False)
    return "avx2" in flags and not any(f in flags for f in INT8_DOT_FLAGS)


def _save_in_ort_layout(quantized, model: Path) -> None:
    """An NNCF-quantized graph as onnx-int8 ships it: ORT's fused layout, the head compressed."""
    import onnx

    ort_layout(quantized)
    compress_onnx_head(quantized)
    onnx.save(quantized, str(model))


def preprocessed(run: RunDir, work: Path, ctx: ExportContext) -> Path:
    """The run's fp32 classifier as ONNX after ORT's recommended quant_pre_process (shape
    inference + optimisation). Built from the backbone ONNX this machine converted once plus the
    run's head (toolkit.bundle_model.onnx_classifier): importing torch, building the classifier
    and exporting it again was 3.4 s of a 25 s onnx-int8 export (2-core AVX2). A run whose
    backbone has weights of its own (--unfreeze, adapt's AdaBN) is exported from torch."""
    import onnx

    from devices.ort_probe import import_onnxruntime

    import_onnxruntime()  # the first onnxruntime import of every onnx-int8 build: without torch
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from toolkit.bundle_model import onnx_classifier
    from toolkit.features import cached_onnx_backbone

    fp32, prep = work / "fp32.onnx", work / "prep.onnx"
    if run.has_backbone_weights:
        write_onnx(ctx.classifier, fp32, ctx)
    else:
        model = onnx_classifier(cached_onnx_backbone(run.spec), run.head_tensors(), run.config["train"]["head"],
                                batch=(ctx.static_batch or 1) if ctx.static else None)
        onnx.save(model, str(fp32))
    quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=False)
    return prep
