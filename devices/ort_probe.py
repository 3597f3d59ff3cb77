"""ONNX Runtime devices: the available execution providers, each mapped to the kind it runs on."""

from __future__ import annotations

import logging
from types import ModuleType

from devices.probe import (
    Device,
    Kind,
    ProbeReport,
    Runtime,
    Use,
    cpu_name,
    import_runtime,
    record_problem,
)

log = logging.getLogger(__name__)

ORT_USES = (Use.EXTRACT_FEATURES, Use.RUN_EXPORTED)

# Provider -> (kind, description). The OpenVINO EP defaults to its CPU device (device_type option).
PROVIDER_KINDS: dict[str, tuple[Kind, str]] = {
    "CPUExecutionProvider": (Kind.CPU, "default CPU kernels"),
    "DnnlExecutionProvider": (Kind.CPU, "oneDNN"),
    "XnnpackExecutionProvider": (Kind.CPU, "XNNPACK"),
    "ACLExecutionProvider": (Kind.CPU, "Arm Compute Library"),
    "ArmNNExecutionProvider": (Kind.CPU, "Arm NN"),
    "OpenVINOExecutionProvider": (Kind.CPU, "OpenVINO, CPU unless device_type is set"),
    "TvmExecutionProvider": (Kind.CPU, "Apache TVM"),
    "CUDAExecutionProvider": (Kind.GPU, "NVIDIA CUDA"),
    "TensorrtExecutionProvider": (Kind.GPU, "NVIDIA TensorRT"),
    "ROCMExecutionProvider": (Kind.GPU, "AMD ROCm"),
    "MIGraphXExecutionProvider": (Kind.GPU, "AMD MIGraphX"),
    "DmlExecutionProvider": (Kind.GPU, "DirectML"),
    "CoreMLExecutionProvider": (Kind.GPU, "Apple Core ML (GPU / Neural Engine)"),
    "WebGpuExecutionProvider": (Kind.GPU, "WebGPU"),
    "QNNExecutionProvider": (Kind.NPU, "Qualcomm QNN (Hexagon NPU)"),
    "VitisAIExecutionProvider": (Kind.NPU, "AMD Vitis AI (Ryzen AI NPU)"),
    "CANNExecutionProvider": (Kind.NPU, "Huawei CANN (Ascend NPU)"),
    "RknpuExecutionProvider": (Kind.NPU, "Rockchip NPU"),
    "NnapiExecutionProvider": (Kind.NPU, "Android NNAPI"),
    "VSINPUExecutionProvider": (Kind.NPU, "VeriSilicon NPU"),
}


def import_onnxruntime() -> ModuleType:
    """`import onnxruntime`, without the training package's import-time side trip into torch.

    onnxruntime-training checks its build at import by importing onnxruntime.training, whose
    `artifacts` module imports torch: 4 s of CPU on a 2-core x86 host that has torch, and torch on
    the robot path. Inference never uses that check's result, so the package is hidden while
    onnxruntime imports and left importable afterwards (the ORT training exporter imports it).
    `onnxruntime.tools` (which quantization's shape inference imports) is imported here too,
    with torch hidden (devices.probe.torch_hidden): it would import torch for its export helpers.
    """
    import contextlib
    import importlib
    import sys

    from devices.probe import torch_hidden

    if "onnxruntime" not in sys.modules and "onnxruntime.training" not in sys.modules:
        sys.modules["onnxruntime.training"] = None  # type: ignore[assignment]  # ImportError for the check
        try:
            importlib.import_module("onnxruntime")
        finally:
            if sys.modules.get("onnxruntime.training", 0) is None:
                del sys.modules["onnxruntime.training"]
    with torch_hidden(), contextlib.suppress(ImportError):  # builds without the tools package
        importlib.import_module("onnxruntime.tools")
    return sys.modules["onnxruntime"]


def probe_onnxruntime() -> ProbeReport:
    """One device per available execution provider; empty only when onnxruntime is not installed."""
    problems: list[str] = []
    modules, failed = import_runtime("onnxruntime", importer=lambda _: import_onnxruntime())
    if failed is not None:
        return failed
    (ort,) = modules

    try:
        providers = list(ort.get_available_providers())
    except Exception as error:
        record_problem(problems, "onnxruntime", "get_available_providers()", error)
        return ProbeReport([], problems)

    version = getattr(ort, "__version__", "?")
    devices = []
    for provider in providers:
        if provider not in PROVIDER_KINDS:
            # Azure, JS, WebNN, ...: remote or browser providers, not hardware on this machine
            log.info("onnxruntime: skipping provider %s (not a local device)", provider)
            continue
        kind, what = PROVIDER_KINDS[provider]
        where = f"{what} on {cpu_name()}" if kind is Kind.CPU else what
        name = f"{where} (onnxruntime {version})"
        devices.append(
            Device(
                Runtime.ONNXRUNTIME, kind, f"ort:{provider}", name, ORT_USES,
                static_shapes=kind is Kind.NPU,  # NPU providers compile for fixed shapes too
            )
        )
    return ProbeReport(devices, problems)
