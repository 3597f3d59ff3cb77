"""Turn torch modules into inference-engine models: OpenVINO IR and ONNX.

Shared by the feature engines (a frozen backbone) and the exporters (the whole classifier), so a
model is converted one way everywhere. Every converted model takes float32 NCHW RGB in 0-255 at
the backbone's input size: normalisation lives inside the graph, so no runtime can forget it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from toolkit.backbones import BackboneSpec

logger = logging.getLogger(__name__)

# onnxruntime-training 1.19 reads IR <= 10 and opset <= 21; 17 is what every current runtime runs.
ONNX_OPSET = 17
ONNX_MAX_IR = 10


def with_normalization(module: Any, spec: BackboneSpec):
    """Wrap `module` so it takes 0-255 RGB and applies the backbone's own normalisation."""
    import torch

    class Normalized(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = module
            self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1))
            self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std).view(1, 3, 1, 1))

        def forward(self, x):
            return self.inner((x - self.mean) * self.inv_std)

    return Normalized().eval()


def to_openvino(module: Any, input_size: int, *, batch: int = -1):
    """Convert an eval-mode torch module to an in-memory openvino.Model (dynamic batch by default)."""
    import openvino as ov
    import torch

    with torch.no_grad():
        return ov.convert_model(
            module,
            example_input=torch.zeros(1, 3, input_size, input_size),
            input=[(batch, 3, input_size, input_size)],
        )


def to_onnx(
    module: Any,
    path: Path,
    input_size: int,
    *,
    input_name: str = "image",
    output_names: tuple[str, ...] = ("features",),
    dynamic_batch: bool = True,
    batch: int = 1,
) -> None:
    """Export an eval-mode torch module to ONNX at `path` (IR version capped for ORT training)."""
    import torch

    axes = {n: {0: "batch"} for n in (input_name, *output_names)} if dynamic_batch else None
    with torch.no_grad():
        # The TorchScript exporter gives a plain, stable graph; the dynamo one needs onnxscript
        # and writes IR versions older runtimes reject.
        torch.onnx.export(
            module,
            (torch.zeros(batch, 3, input_size, input_size),),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=axes,
        )
    cap_ir_version(path)


def cap_ir_version(path: Path) -> None:
    """Lower an ONNX file's IR version to what onnxruntime-training 1.19 reads (newer onnx
    packages stamp their own, higher IR even when no newer feature is used)."""
    import onnx

    model = onnx.load(str(path))
    if model.ir_version > ONNX_MAX_IR:
        model.ir_version = ONNX_MAX_IR
        onnx.save(model, str(path))


def save_ir(model, xml_path: Path) -> None:
    """Save an openvino.Model as IR atomically: never a .xml without its matching .bin.

    Constants are written exactly as they are (no second fp16 compression of a read model).
    """
    import openvino as ov

    xml_path = Path(xml_path)
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=xml_path.parent, prefix=".ir."))
    try:
        ov.save_model(model, str(tmp / "m.xml"), compress_to_fp16=False)
        # .bin first: a reader that finds the .xml always finds its weights beside it.
        os.replace(tmp / "m.bin", xml_path.with_suffix(".bin"))
        os.replace(tmp / "m.xml", xml_path)
    finally:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()


def load_nncf():
    """The nncf module, imported without torch (devices.probe.torch_hidden)."""
    from devices.probe import torch_hidden

    with torch_hidden():
        import nncf
    return nncf


@contextlib.contextmanager
def nncf_session(follow: str = "toolkit"):
    """Run NNCF without torch and at the verbosity of edgetune's own `follow` logger; yields nncf.

    NNCF sets its logger to INFO when imported, which floods a quiet CLI with per-node notes;
    inside this block it logs only what edgetune itself would, then gets its level back.
    onnx is hidden too unless already loaded: NNCF tells an OpenVINO model from an ONNX one by
    importing onnx (0.5 s on the AMX Xeon), and an ONNX model means onnx is loaded already.
    """
    from devices.probe import torch_hidden

    nncf = load_nncf()  # import first: it resets its logger level on import
    nncf_logger = logging.getLogger("nncf")
    before = nncf_logger.level
    nncf_logger.setLevel(logging.getLogger(follow).getEffectiveLevel())
    try:
        with torch_hidden("onnx"):
            yield nncf
    finally:
        nncf_logger.setLevel(before)
