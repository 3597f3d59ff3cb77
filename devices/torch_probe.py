"""PyTorch devices: cpu, cuda:N, xpu:N, mps, and Ascend npu:N when torch_npu imports."""

from __future__ import annotations

import logging

from devices.probe import (
    Device,
    Kind,
    ProbeReport,
    Runtime,
    Use,
    cpu_name,
    import_runtime,
    is_missing_package,
    record_problem,
)

log = logging.getLogger(__name__)

# torch runs every job; only its devices can backpropagate through the backbone.
TORCH_USES = (Use.TRAIN_HEAD, Use.EXTRACT_FEATURES, Use.FINETUNE_BACKBONE)
XPU_PRECISIONS = ("fp32", "fp16", "bf16")
NPU_PRECISIONS = ("fp32", "fp16")


def probe_torch() -> ProbeReport:
    """Every device PyTorch can use here; empty only when torch is not installed."""
    # bf16 on CPU is only fast with AMX / AVX512-BF16, which torch does not report: claim fp32.
    cpu = Device(Runtime.TORCH, Kind.CPU, "cpu", cpu_name(), TORCH_USES, ("fp32",))
    if cpu_only_wheel():
        return ProbeReport([cpu], [])
    devices: list[Device] = [cpu]
    problems: list[str] = []
    modules, failed = import_runtime("torch")
    if failed is not None:
        return failed
    (torch,) = modules

    for backend in (_cuda, _xpu, _mps, _ascend_npu):
        try:
            devices.extend(backend(torch))
        except Exception as error:
            record_problem(problems, "torch", f"{backend.__name__.strip('_')} probe", error)
    return ProbeReport(devices, problems)


def cpu_only_wheel() -> bool:
    """True when the installed torch is one of PyTorch's CPU-only wheels (local version "+cpu")
    and no device plugin (torch_npu) is installed: the CPU is then its only device, known without
    importing torch (1.5 s on a 2-core x86, which `edgetune train` otherwise pays for nothing)."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError, version

    try:
        if importlib.util.find_spec("torch") is None:  # not importable here (or hidden)
            return False
        return version("torch").endswith("+cpu") and importlib.util.find_spec("torch_npu") is None
    except (ImportError, ValueError, PackageNotFoundError):
        return False


def _cuda(torch) -> list[Device]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        precisions = ["fp32", "fp16"]
        if torch.cuda.get_device_capability(index) >= (8, 0):  # Ampere and later do bf16
            precisions.append("bf16")
        name = torch.cuda.get_device_name(index)
        found.append(
            Device(Runtime.TORCH, Kind.GPU, f"cuda:{index}", name, TORCH_USES, tuple(precisions))
        )
    return found


def _xpu(torch) -> list[Device]:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return []
    return [
        Device(Runtime.TORCH, Kind.GPU, f"xpu:{i}", xpu.get_device_name(i), TORCH_USES, XPU_PRECISIONS)
        for i in range(xpu.device_count())
    ]


def _mps(torch) -> list[Device]:
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return []
    return [Device(Runtime.TORCH, Kind.GPU, "mps", f"Apple MPS ({cpu_name()})", TORCH_USES, ("fp32", "fp16"))]


def _ascend_npu(torch) -> list[Device]:
    try:
        import torch_npu  # noqa: F401  registers torch.npu
    except Exception as error:
        if is_missing_package(error, "torch_npu"):
            return []
        raise
    return [
        Device(Runtime.TORCH, Kind.NPU, f"npu:{i}", torch.npu.get_device_name(i), TORCH_USES, NPU_PRECISIONS)
        for i in range(torch.npu.device_count())
    ]
