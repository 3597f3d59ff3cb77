"""ONNX int8: static QDQ quantization with onnxruntime.quantization, per-channel weights.

The fp32 graph is first run through quant_pre_process (shape inference + graph optimisation, as
ORT recommends), then calibrated on eval views of the run's training images (or --calib). The
head (Gemm) and softmax stay fp32: they are a tiny share of the compute, and int8 logits would
round near-ties. With --max-drop, when that drop is over budget, NNCF's accuracy-controlled
quantization redoes it on the same ONNX graph, keeping the layers that cost most in fp32.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from exporters import register
from exporters.base import ExportContext, Exporter
from exporters.onnx_fp32 import write_onnx
from toolkit.convert import nncf_verbosity
from toolkit.runtime import run_batched
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


def quantize(fp32: Path, out: Path, calib: np.ndarray, *, batch: int) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    graph = onnx.load(str(fp32)).graph
    head = [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul", "Softmax")]
    quantize_static(
        str(fp32), str(out), _reader(calib, graph.input[0].name, batch),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=head,
        # Calibrate a few batches at a time, merging ranges between strides: MinMax otherwise keeps
        # every activation of every batch in memory. Not CalibMaxIntermediateOutputs: in ORT 1.19 it
        # drops the held outputs without folding them into the ranges (microsoft/onnxruntime#18893),
        # so only the last few batches were calibrated on (0.65-point drop on ants/bees; 0 with all).
        extra_options={"CalibStridedMinMax": _stride(-(-len(calib) // batch))},
    )


@register
class OnnxInt8Exporter(Exporter):
    name = "onnx-int8"
    runtime = "onnxruntime"
    precision = "int8"
    tolerance = None
    description = "ONNX int8 (QDQ, per-channel), for ORT CPU / NPU execution providers"

    def build(self, run: RunDir, classifier, out_dir: Path, ctx: ExportContext) -> Path:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        out_dir = Path(out_dir)
        calib = ctx.calibration_inputs()
        model = out_dir / "model.onnx"
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work.") as work:
            fp32, prep = Path(work) / "fp32.onnx", Path(work) / "prep.onnx"
            write_onnx(classifier, fp32, ctx)
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=False)
            quantize(prep, model, calib, batch=ctx.static_batch or 8)
            if ctx.max_drop is not None:
                drop = _accuracy_drop(self, model, ctx, run)
                logger.info("onnx-int8 with onnxruntime.quantization: drop %.2f points", drop)
                if drop > ctx.max_drop:
                    _quantize_with_budget(prep, model, calib, ctx)
                    ctx.extra["quantizer"] = "nncf.quantize_with_accuracy_control"
        return model


def _quantize_with_budget(prep: Path, out: Path, calib: np.ndarray, ctx: ExportContext) -> None:
    """NNCF's accuracy-controlled quantization on the ONNX graph: it ranks layers by how much their
    quantization costs on the val set and reverts the worst to fp32 until the drop fits the budget."""
    import nncf
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(prep))
    name = model.graph.input[0].name
    b = ctx.static_batch or 1
    inputs, labels = ctx.val_inputs()
    calibration = nncf.Dataset([calib[i : i + b] for i in range(0, len(calib) - b + 1, b)], lambda x: {name: x})
    items = [(inputs[i : i + b], labels[i : i + b]) for i in range(0, len(inputs) - b + 1, b)]
    validation = nncf.Dataset(items, lambda item: {name: item[0]})

    def accuracy(candidate, data) -> float:
        session = ort.InferenceSession(candidate.SerializeToString(), providers=["CPUExecutionProvider"])
        hits = total = 0
        for x, y in data:
            hits += int((session.run(None, {name: x})[0].argmax(1) == y).sum())
            total += len(y)
        return hits / max(1, total)

    logger.info("onnx-int8: NNCF accuracy-controlled quantization, max drop %.2f points", ctx.max_drop)
    with nncf_verbosity("exporters"):
        quantized = nncf.quantize_with_accuracy_control(
            model, calibration, validation, accuracy, max_drop=ctx.max_drop / 100.0,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib),
            ignored_scope=nncf.IgnoredScope(types=["Gemm", "MatMul", "Softmax"], validate=False),
        )
    onnx.save(quantized, str(out))


def _accuracy_drop(exporter: Exporter, model: Path, ctx: ExportContext, run: RunDir) -> float:
    from exporters import parity

    inputs, labels = ctx.val_inputs()
    reference = parity.cached_source_logits(run, run.build_classifier(), inputs)
    exported = run_batched(exporter.runner(model, ctx), inputs, batch=ctx.static_batch)
    return parity.measure(reference, exported, labels).accuracy_drop
