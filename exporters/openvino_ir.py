"""OpenVINO IR: fp16 weights by default (--fp32 keeps fp32), and int8 with NNCF.

fp16 IR halves the file; the CPU plugin decompresses the weights to fp32 at load, GPUs and NPUs
compute in fp16. int8 uses NNCF post-training quantization calibrated on eval views of the run's
training images (or --calib); with --max-drop, NNCF's accuracy-controlled quantization reverts
the most harmful layers to fp32 until the val accuracy drop is within budget.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from exporters import register
from exporters.base import MAX_CALIBRATION, ExportContext, Exporter
from exporters.onnx_fp32 import with_probabilities
from toolkit.convert import nncf_verbosity
from toolkit.runs import RunDir

logger = logging.getLogger(__name__)

MODEL_FILE = "model.xml"


def head_scope():
    """The head (MatMul) and softmax stay fp32: a sliver of the compute, and int8 logits round near-ties."""
    import nncf

    return nncf.IgnoredScope(types=["MatMul", "Softmax"], validate=False)


def convert(classifier, ctx: ExportContext):
    """The classifier as an openvino.Model with named input/outputs (image -> logits, probabilities)."""
    from toolkit.convert import to_openvino

    model = to_openvino(with_probabilities(classifier), ctx.input_size, batch=ctx.static_batch or -1)
    model.inputs[0].get_tensor().set_names({"image"})
    for port, name in zip(model.outputs, ("logits", "probabilities")):
        port.get_tensor().set_names({name})
    return model


def save(model, path: Path, *, fp16: bool) -> Path:
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=fp16)
    return path


@register
class OpenVINOExporter(Exporter):
    name = "openvino"
    runtime = "openvino"
    precision = "fp16"
    # fp16 weights (11-bit mantissa) move logits by ~1e-3 of their magnitude; top-1 must still agree.
    tolerance = 2e-2
    relative_tolerance = True
    fp32_tolerance = 1e-3
    description = "OpenVINO IR (fp16 weights; --fp32 keeps fp32)"

    def tolerance_for(self, ctx: ExportContext) -> float | None:
        return self.fp32_tolerance if ctx.fp32 else self.tolerance

    def build(self, run: RunDir, classifier, out_dir: Path, ctx: ExportContext) -> Path:
        self.effective_precision = "fp32" if ctx.fp32 else "fp16"
        return save(convert(classifier, ctx), Path(out_dir) / MODEL_FILE, fp16=not ctx.fp32)


@register
class OpenVINOInt8Exporter(Exporter):
    name = "openvino-int8"
    runtime = "openvino"
    precision = "int8"
    tolerance = None
    description = "OpenVINO IR int8 (NNCF post-training quantization)"

    def build(self, run: RunDir, classifier, out_dir: Path, ctx: ExportContext) -> Path:
        import nncf

        model = convert(classifier, ctx)
        calib = ctx.calibration_inputs()
        b = ctx.static_batch or 1
        calibration = nncf.Dataset([calib[i : i + b] for i in range(0, len(calib) - b + 1, b)])
        with nncf_verbosity("exporters"):
            if ctx.max_drop is None:
                quantized = nncf.quantize(model, calibration, subset_size=len(calib), fast_bias_correction=True,
                                          ignored_scope=head_scope())
            else:
                quantized = self._quantize_with_budget(model, calibration, ctx)
        # Remaining float constants (biases, scales) as fp16: smaller file, same int8 compute.
        return save(quantized, Path(out_dir) / MODEL_FILE, fp16=not ctx.fp32)

    @staticmethod
    def _quantize_with_budget(model, calibration, ctx: ExportContext):
        import nncf

        inputs, labels = ctx.val_inputs()
        b = ctx.static_batch or 1
        items = [(inputs[i : i + b], labels[i : i + b]) for i in range(0, len(inputs) - b + 1, b)]
        validation = nncf.Dataset(items, lambda item: item[0])

        def accuracy(compiled, data) -> float:
            hits = total = 0
            for x, y in data:
                pred = np.asarray(compiled(x)[0]).argmax(1)
                hits += int((pred == y).sum())
                total += len(y)
            return hits / max(1, total)

        logger.info("NNCF accuracy-controlled quantization, max drop %.2f points", ctx.max_drop)
        return nncf.quantize_with_accuracy_control(
            model, calibration, validation, accuracy, max_drop=ctx.max_drop / 100.0,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=MAX_CALIBRATION, ignored_scope=head_scope(),
        )
