"""Pure device selection: which device runs the frozen backbone, which trains the head.

Every function takes the device list as an argument (from `detect_devices().devices` or from a
test), so the choices are testable without the hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from devices.probe import Device, Kind, Runtime, Use
from toolkit.errors import DeviceError

ACCEPTED_FORMS = (
    "auto, cpu, cuda[:N], xpu[:N], mps, npu[:N], openvino:CPU, openvino:GPU[.N], openvino:NPU, "
    "ort:<ExecutionProvider>"
)

_TORCH_RE = re.compile(r"^(cpu|mps|(?P<family>cuda|xpu|npu)(:\d+)?)$")
_OPENVINO_RE = re.compile(r"^openvino:(?P<dev>[A-Za-z]+(\.\d+)?)$", re.IGNORECASE)
_ORT_RE = re.compile(r"^ort:(?P<provider>[A-Za-z0-9_]+)$", re.IGNORECASE)


def normalize_request(request: str) -> str:
    """Check the syntax of a --device value and return it in canonical spelling.

    Raises DeviceError listing the accepted forms when the value is not one of them.
    """
    text = request.strip()
    if text.lower() == "auto" or _TORCH_RE.match(text.lower()):
        return text.lower()
    if match := _OPENVINO_RE.match(text):
        return f"openvino:{match['dev'].upper()}"
    if match := _ORT_RE.match(text):
        return f"ort:{match['provider']}"
    raise DeviceError(f"Unknown device '{request}'. Accepted forms: {ACCEPTED_FORMS}.")


def _absent(request: str, available: list[Device], what: str = "") -> DeviceError:
    ids = ", ".join(device.id for device in available) or "none"
    return DeviceError(
        f"Device '{request}' is not available here{what}. Available: {ids} (see `edgetune devices`)."
    )


def _ort_key(provider: str) -> str:
    return provider.lower().removesuffix("executionprovider")


def find_device(request: str, available: list[Device]) -> Device:
    """The device a non-auto request names: exact id, or an alias such as 'cuda' (first CUDA GPU),
    'openvino:GPU' (first OpenVINO GPU) or 'ort:cuda' (CUDAExecutionProvider)."""
    wanted = normalize_request(request)
    by_id = {device.id: device for device in available}
    if wanted in by_id:
        return by_id[wanted]
    if match := _TORCH_RE.match(wanted):
        if match["family"] and ":" not in wanted:  # 'cuda' means the first CUDA device
            for device in available:
                if device.runtime is Runtime.TORCH and device.id.startswith(wanted + ":"):
                    return device
    elif wanted.startswith("openvino:"):
        ov_name = wanted.split(":", 1)[1]
        base, _, index = ov_name.partition(".")
        for device in available:
            if device.runtime is not Runtime.OPENVINO:
                continue
            other = device.id.split(":", 1)[1]
            # OpenVINO names a lone GPU 'GPU' and several 'GPU.0', 'GPU.1': accept either spelling
            if (not index and other.startswith(base + ".")) or (index == "0" and other == base):
                return device
    else:
        key = _ort_key(wanted.split(":", 1)[1])
        for device in available:
            if device.runtime is Runtime.ONNXRUNTIME and _ort_key(device.id.split(":", 1)[1]) == key:
                return device
    raise _absent(request, available)


# --- ranking ------------------------------------------------------------------------------------

def _feature_rank(device: Device) -> tuple[int, str] | None:
    """Lower is better for running a frozen backbone; None when the device cannot extract features."""
    if Use.EXTRACT_FEATURES not in device.uses:
        return None
    if device.runtime is Runtime.TORCH:
        if device.id.startswith("cuda"):
            return 0, "CUDA GPU"
        if device.kind is Kind.CPU:
            return 9, "eager PyTorch on the CPU; no faster inference engine here"
        return 4, "torch accelerator"
    if device.runtime is Runtime.OPENVINO:
        return {Kind.NPU: (1, "OpenVINO NPU"), Kind.GPU: (2, "OpenVINO GPU")}.get(
            device.kind, (5, "fastest inference engine here")
        )
    if device.id == "ort:CPUExecutionProvider":
        # ONNX Runtime's default CPU kernels still beat eager PyTorch for inference
        return 8, "ONNX Runtime on the CPU"
    return {Kind.GPU: 6, Kind.NPU: 6}.get(device.kind, 7), "accelerated ONNX Runtime provider"


_TORCH_TRAIN_ORDER = ("cuda", "npu", "xpu", "mps", "cpu")


def _torch_rank(device: Device) -> int | None:
    if device.runtime is not Runtime.TORCH or Use.TRAIN_HEAD not in device.uses:
        return None
    family = device.id.split(":")[0]
    return _TORCH_TRAIN_ORDER.index(family) if family in _TORCH_TRAIN_ORDER else len(_TORCH_TRAIN_ORDER)


def best_torch_device(available: list[Device], *, purpose: str = "training") -> Device:
    """cuda > Ascend npu > xpu > mps > cpu; DeviceError when torch has no device (not installed)."""
    ranked = [(rank, i, d) for i, d in enumerate(available) if (rank := _torch_rank(d)) is not None]
    if not ranked:
        ids = ", ".join(d.id for d in available) or "none"
        raise DeviceError(
            f"{purpose.capitalize()} needs PyTorch, and no torch device was found (is torch installed?). "
            f"Available: {ids} (see `edgetune devices`)."
        )
    return min(ranked)[2]


def best_feature_device(available: list[Device]) -> tuple[Device, str]:
    """The best device for a frozen backbone and the reason, e.g. 'OpenVINO NPU'."""
    ranked = []
    for index, device in enumerate(available):
        if (rank := _feature_rank(device)) is not None:
            ranked.append((rank[0], index, device, rank[1]))
    if not ranked:
        raise _absent("auto", available, " (nothing here can run a backbone)")
    _, _, device, why = min(ranked)
    return device, why


# --- plans --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Where training runs: the frozen backbone on `features`, the head on `head`."""

    features: Device
    head: Device
    reason: str

    def to_json(self) -> dict:
        return {"features": self.features.to_json(), "head": self.head.to_json(), "reason": self.reason}


def _finetune_error(request: str, available: list[Device]) -> DeviceError:
    torch_ids = ", ".join(d.id for d in available if _torch_rank(d) is not None) or "none"
    return DeviceError(
        f"Partial unfreezing backpropagates through the backbone, which needs a torch device, "
        f"but '{request}' only runs inference. Use --device auto or one of: {torch_ids}."
    )


def plan_training(request: str, available: list[Device], *, finetune_backbone: bool = False) -> Plan:
    """Choose where the backbone and the head run for `edgetune train --device REQUEST`."""
    wanted = normalize_request(request)
    if wanted == "auto":
        head = best_torch_device(available)
        if finetune_backbone:
            return Plan(head, head, f"backbone and head on {head.id} (partial unfreezing needs torch)")
        features, why = best_feature_device(available)
        return Plan(features, head, f"features on {features.id} ({why}), head on {head.id}")

    device = find_device(wanted, available)
    if device.runtime is Runtime.TORCH:
        return Plan(device, device, f"backbone and head on {device.id} (requested)")
    if finetune_backbone:
        raise _finetune_error(request, available)
    if Use.EXTRACT_FEATURES not in device.uses:
        raise DeviceError(f"Device '{device.id}' cannot run a backbone. Use --device auto.")
    head = best_torch_device(available)
    return Plan(device, head, f"features on {device.id} (requested), head on {head.id}")


def _inference_rank(device: Device) -> int | None:
    """Same order as for features; torch devices count too (they run a run directory)."""
    if device.runtime is not Runtime.TORCH and Use.RUN_EXPORTED not in device.uses:
        return None
    rank = _feature_rank(device)
    return None if rank is None else rank[0]


def select_inference_device(
    request: str, available: list[Device], *, runtime: Runtime | str | None = None
) -> Device:
    """The device for `edgetune predict/benchmark --device REQUEST`.

    `runtime` is the runtime the model needs (openvino for IR, onnxruntime for ONNX, torch for a
    run directory); 'auto' picks the best device of that runtime.
    """
    runtime = Runtime(runtime) if runtime is not None else None
    candidates = [d for d in available if runtime is None or d.runtime is runtime]
    wanted = normalize_request(request)
    if wanted != "auto":
        device = find_device(wanted, available)
        if runtime is not None and device.runtime is not runtime:
            ids = ", ".join(d.id for d in candidates) or "none"
            raise DeviceError(
                f"Device '{request}' is a {device.runtime.value} device, but this model runs on "
                f"{runtime.value}. Use one of: {ids} (see `edgetune devices`)."
            )
        return device
    ranked = [(rank, i, d) for i, d in enumerate(candidates) if (rank := _inference_rank(d)) is not None]
    if not ranked:
        what = f" for {runtime.value} (is it installed?)" if runtime else ""
        raise _absent("auto", available, what)
    return min(ranked)[2]
