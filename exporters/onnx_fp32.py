"""ONNX, fp32: the whole classifier (normalisation, backbone, head) as one graph for any runtime."""

from __future__ import annotations

from pathlib import Path

from exporters import register
from exporters.base import ExportContext, Exporter
from toolkit.runs import RunDir

OUTPUTS = ("logits", "probabilities")


def with_probabilities(classifier):
    """The classifier with a second output, softmax probabilities, so a robot needs no math."""
    import torch

    class WithProbabilities(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier

        def forward(self, x):
            logits = self.classifier(x)
            return logits, torch.softmax(logits, dim=1)

    return WithProbabilities().eval()


def write_onnx(classifier, path: Path, ctx: ExportContext) -> Path:
    import warnings

    from toolkit.convert import to_onnx

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant folding")  # harmless TorchScript notes
        to_onnx(with_probabilities(classifier), path, ctx.input_size, output_names=OUTPUTS,
                dynamic_batch=not ctx.static, batch=ctx.static_batch or 1)
    return path


@register
class OnnxExporter(Exporter):
    name = "onnx"
    runtime = "onnxruntime"
    precision = "fp32"
    tolerance = 1e-3
    description = "ONNX fp32, runs on ONNX Runtime / OpenVINO / TensorRT"

    def build(self, run: RunDir, out_dir: Path, ctx: ExportContext) -> Path:
        return write_onnx(ctx.classifier, Path(out_dir) / "model.onnx", ctx)
