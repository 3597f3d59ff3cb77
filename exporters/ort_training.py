"""ONNX Runtime on-device training artifacts: a robot keeps training the head with ONNX Runtime's
training API (C/C++ and mobile; its Python module, onnxruntime.training.api, imports torch in
1.19.2, so a torch-free robot uses those or `edgetune learn`).

Writes training_model.onnx, eval_model.onnx, optimizer_model.onnx and checkpoint, plus inference.onnx exported from them, which the parity check and
`edgetune predict` run. Only the head's parameters get gradients; the backbone is exported in eval
mode and its BatchNorm layers are folded into the convolutions before the artifacts are made:
onnxruntime-training turns every BatchNormalization of a training graph into its training-mode
kernel (batch statistics), so a robot's train step would otherwise see other features than its
inference, and a head trained there would not carry over.
"""

from __future__ import annotations

import logging
import platform
import sys
import tempfile
from pathlib import Path

from exporters import register
from exporters.base import ExportContext, Exporter
from toolkit.convert import ONNX_OPSET, cap_ir_version
from toolkit.errors import EdgetuneError
from toolkit.runs import RunDir

logger = logging.getLogger(__name__)

ARTIFACTS = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
INFERENCE_MODEL = "inference.onnx"
HEAD_PREFIX = "inner.1."  # with_normalization(Sequential(backbone, head)): the head is inner.1


def require_training_api():
    """Import onnxruntime.training.artifacts, or say clearly why it is not here."""
    try:
        from onnxruntime.training import artifacts
    except ImportError as e:
        raise EdgetuneError(
            "onnxruntime-training is not available on this platform "
            f"(Python {sys.version_info.major}.{sys.version_info.minor}, {platform.machine()}: {e}). "
            "Upstream publishes onnxruntime-training-cpu for CPython <= 3.12 on x86_64 only; "
            "use --format onnx and train on a machine with edgetune instead."
        ) from None
    return artifacts


def export_trainable_onnx(classifier, path: Path, ctx: ExportContext) -> None:
    """The classifier with parameters kept as named initializers (no constant folding)."""
    import torch

    with torch.no_grad():
        torch.onnx.export(
            classifier.eval(),
            (torch.zeros(ctx.static_batch or 1, 3, ctx.input_size, ctx.input_size),),
            str(path),
            dynamo=False,
            export_params=True,
            do_constant_folding=False,  # folding would bake parameters into anonymous constants
            training=torch.onnx.TrainingMode.EVAL,  # BatchNorm frozen: running statistics only
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=None if ctx.static else {"image": {0: "batch"}, "logits": {0: "batch"}},
        )
    cap_ir_version(path)


def fold_batchnorm(model) -> int:
    """In place: every BatchNormalization that alone reads a Conv's output is folded into that
    Conv's weight and bias (eval-mode statistics: y = (conv(x) - mean) * scale / sqrt(var + eps) + B).
    Returns how many were folded."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    folded = []
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers.get(bn.input[0], 0) != 1 or len(bn.output) != 1 \
                or conv.input[1] not in inits or not all(i in inits for i in bn.input[1:]):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 else np.zeros(len(w))
        k = scale / np.sqrt(var + eps)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32),
                                                              conv.input[1]))
        bias_name = f"{conv.input[1]}_folded_bias"
        g.initializer.append(numpy_helper.from_array(((b - mean) * k + beta).astype(np.float32), bias_name))
        conv.input[:] = [conv.input[0], conv.input[1], bias_name]
        conv.output[0] = bn.output[0]
        folded.append(bn)
    for bn in folded:
        g.node.remove(bn)
    used = {i for n in g.node for i in n.input}
    for init in [i for i in g.initializer if i.name not in used]:
        g.initializer.remove(init)
    return len(folded)


def add_probabilities(path: Path) -> None:
    """Append softmax probabilities as a second output, like every other export has."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    logits = next(o for o in model.graph.output if o.name == "logits")
    model.graph.node.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    probabilities = onnx.ValueInfoProto()
    probabilities.CopyFrom(logits)
    probabilities.name = "probabilities"
    model.graph.output.append(probabilities)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@register
class OrtTrainingExporter(Exporter):
    name = "ort-training"
    runtime = "onnxruntime"
    precision = "fp32"
    tolerance = 1e-3
    description = "ONNX Runtime on-device training artifacts (head trainable) + inference.onnx"

    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        import onnx

        artifacts = require_training_api()
        from onnxruntime.training import api

        out_dir, classifier = Path(out_dir), ctx.classifier
        trainable = [n for n, p in classifier.named_parameters() if n.startswith(HEAD_PREFIX)]
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".work.") as work:
            base = Path(work) / "base.onnx"
            export_trainable_onnx(classifier, base, ctx)
            model = onnx.load(str(base))
            folded = fold_batchnorm(model)
            names = {init.name for init in model.graph.initializer}
            missing = [n for n in trainable if n not in names]
            if missing:
                raise EdgetuneError(f"ort-training: head parameters {missing} were not kept as initializers.")
            frozen = [n for n in names if n not in trainable]
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen,
                loss=artifacts.LossType.CrossEntropyLoss, optimizer=artifacts.OptimType.AdamW,
                artifact_directory=str(out_dir),
            )
        for name in ARTIFACTS[:3]:  # onnxblock writes the onnx package's IR (14 with onnx 1.23)
            cap_ir_version(out_dir / name)
        state = api.CheckpointState.load_checkpoint(str(out_dir / "checkpoint"))
        module = api.Module(str(out_dir / "training_model.onnx"), state, str(out_dir / "eval_model.onnx"))
        module.export_model_for_inferencing(str(out_dir / INFERENCE_MODEL), ["logits"])
        add_probabilities(out_dir / INFERENCE_MODEL)
        ctx.extra.update({
            "outputs": ["logits", "probabilities"],
            "training": {"artifacts": list(ARTIFACTS), "trainable": trainable, "loss": "CrossEntropyLoss",
                         "optimizer": "AdamW", "labels_input": "labels (int64, N)",
                         "backbone": f"frozen, eval mode ({folded} BatchNorm layers folded into their convolutions)"},
        })
        return out_dir / INFERENCE_MODEL
