"""OpenVINO IR: fp16 weights by default (--fp32 keeps fp32), and int8 with NNCF.

fp16 IR halves the file; the CPU plugin decompresses the weights to fp32 at load, GPUs and NPUs
compute in fp16. int8 uses NNCF post-training quantization calibrated on eval views of the run's
training images (or --calib); with --max-drop, NNCF's accuracy-controlled quantization reverts
the most harmful layers to fp32 until the val accuracy drop is within budget. The head computes in
float with its weights stored compressed (exporters.head_weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from exporters import register
from exporters.base import ExportContext, Exporter
from exporters.head_weights import compress_openvino_head
from exporters.onnx_fp32 import with_probabilities
from toolkit.convert import load_nncf, nncf_session
from toolkit.runs import RunDir

logger = logging.getLogger(__name__)

MODEL_FILE = "model.xml"


HEAD_OPS = ("MatMul", "Softmax")
# What manifest.json records.
QUANTIZER = "nncf.quantize (depthwise layers read float inputs, weights int8; stem and first two blocks float)"


def head_scope(onnx: bool = False):
    """The head (MatMul; Gemm in an ONNX graph) and softmax stay fp32: a sliver of the compute, and
    int8 logits round near-ties (ORT's quantizer leaves the same in float for onnx-int8)."""
    return load_nncf().IgnoredScope(types=[*HEAD_OPS] + ["Gemm"] * onnx, validate=False)


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

    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        self.effective_precision = "fp32" if ctx.fp32 else "fp16"
        return save(convert(ctx.classifier, ctx), Path(out_dir) / MODEL_FILE, fp16=not ctx.fp32)


@register
class OpenVINOInt8Exporter(Exporter):
    name = "openvino-int8"
    runtime = "openvino"
    precision = "int8"
    tolerance = None
    description = "OpenVINO IR int8 (NNCF post-training quantization)"

    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        if run.int8_backbone is not None:
            # The head learned on this exact quantized backbone: ship it, never a re-quantization.
            ctx.extra["quantizer"] = "the run's own int8 backbone (--backbone-precision int8)"
            model = with_head(run.int8_backbone, run, ctx)
        else:
            with ctx.stage("convert"):
                model = cached_classifier(run, ctx)
            calib = ctx.calibration_inputs()
            with ctx.stage("calibrate + quantize"):
                model = quantize(model, calib, batch=ctx.static_batch or 1)
            ctx.extra["quantizer"] = QUANTIZER
        compress_openvino_head(model)
        # Remaining float constants (biases, scales) as fp16: smaller file, same int8 compute.
        return save(model, Path(out_dir) / MODEL_FILE, fp16=not ctx.fp32)

    def build_with_accuracy_control(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        from toolkit.features import int8_advanced_parameters

        model = cached_classifier(run, ctx)
        calib = ctx.calibration_inputs()
        b = ctx.static_batch or 1
        validation, accuracy, max_drop = agreement_check(calib, run, b, ctx, lambda compiled, x: compiled(x)[0])
        logger.info("NNCF accuracy-controlled quantization, max agreement loss %.2f%% on the calibration images",
                    100 * max_drop)
        with nncf_session("exporters") as nncf:
            quantized = nncf.quantize_with_accuracy_control(
                model, nncf.Dataset(batches(calib, b)), nncf.Dataset(validation, lambda item: item[0]), accuracy,
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib), ignored_scope=head_scope(),
                advanced_accuracy_restorer_parameters=restorer_parameters(),
                advanced_quantization_parameters=int8_advanced_parameters(),
            )
        ctx.extra["quantizer"] = "nncf.quantize_with_accuracy_control"
        compress_openvino_head(quantized)
        return save(quantized, Path(out_dir) / MODEL_FILE, fp16=not ctx.fp32)


def batches(x: np.ndarray, b: int) -> list[np.ndarray]:
    return [x[i : i + b] for i in range(0, len(x) - b + 1, b)]


def quantize(model, calib: np.ndarray, *, batch: int = 1):
    """NNCF int8 with the settings measured best across datasets (toolkit.features.backbone_int8:
    the depthwise layers, the stem and the first two blocks read float inputs), the head in fp32."""
    from toolkit.features import backbone_int8

    return backbone_int8(model, batches(calib, batch), float_ops=HEAD_OPS)


def agreement_check(calib: np.ndarray, run: RunDir, b: int, ctx: ExportContext, run_model):
    """(items, metric, max_drop) for NNCF's accuracy control, on TRAINING images: the metric is top-1
    agreement with the run-dir model, and the allowed loss the budget's. Layers to keep in
    float are chosen there, never on the val split, which only checks the result."""
    from exporters.parity import run_dir_logits

    target = run_dir_logits(run, calib).argmax(1)
    items = [(calib[i : i + b], target[i : i + b]) for i in range(0, len(calib) - b + 1, b)]
    budget = ctx.budget
    max_drop = max(1e-4, min(budget.max_drop / 100.0, 1.0 - budget.min_agreement))

    def metric(model, data) -> float:
        hits = total = 0
        for x, y in data:
            hits += int((np.asarray(run_model(model, x)).argmax(1) == y).sum())
            total += len(y)
        return hits / max(1, total)

    return items, metric, max_drop


def restorer_parameters():
    """Bounds on NNCF's accuracy restorer: it ranks layers on a 64-image subset (ranking every
    layer on all calibration images takes minutes on 2 cores) and reverts at most 12 of them."""
    return load_nncf().AdvancedAccuracyRestorerParameters(ranking_subset_size=64, max_num_iterations=12)


def cached_classifier(run: RunDir, ctx: ExportContext):
    """The run's classifier as an openvino.Model built from the fp32 backbone IR that training
    converted once and cached (toolkit.features) plus the run's head: converting the whole torch
    classifier again took longer than quantizing it. Same graph as `convert` (parity checks it).

    A run that carries backbone weights of its own (an --unfreeze tail, adapt's AdaBN statistics)
    is not the pretrained backbone: its classifier is converted instead."""
    from toolkit.features import _openvino_backbone

    if run.has_backbone_weights:
        return convert(ctx.classifier, ctx)
    return with_head(_openvino_backbone(run.spec, "fp32", None), run, ctx)


def with_head(backbone_ir, run: RunDir, ctx: ExportContext):
    """An OpenVINO backbone (image -> features; an IR path or an openvino.Model, which is copied)
    followed by the run's head, built in OpenVINO ops from its tensors (toolkit.bundle_model, the
    graph `learn` writes), as one openvino.Model with the same inputs/outputs as `convert`."""
    import openvino as ov

    from toolkit.bundle_model import openvino_classifier
    from toolkit.features import float_input

    if isinstance(backbone_ir, ov.Model):
        backbone = float_input(backbone_ir.clone())
    else:
        backbone = float_input(ov.Core().read_model(str(backbone_ir)))
    if ctx.static_batch:
        backbone.reshape([ctx.static_batch, *list(backbone.inputs[0].get_partial_shape())[1:]])
    features = backbone.get_results()[0].input_value(0)  # the tensor the Result reads, not the Result
    model = openvino_classifier(backbone, features, run.head_tensors(), run.config["train"]["head"])
    model.inputs[0].get_tensor().set_names({"image"})
    return model
