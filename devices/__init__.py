"""What hardware is here and how to use it, per runtime (PyTorch, OpenVINO, ONNX Runtime).

Importing this package imports none of the runtimes: each probe imports its own when called.
"""

from devices.openvino_probe import probe_openvino
from devices.ort_probe import probe_onnxruntime
from devices.probe import Device, Kind, ProbeReport, Runtime, Use, detect_devices
from devices.select import Plan, find_device, normalize_request, plan_training, select_inference_device
from devices.torch_probe import probe_torch

__all__ = [
    "Device",
    "Kind",
    "Plan",
    "ProbeReport",
    "Runtime",
    "Use",
    "compile_config",
    "compile_model",
    "detect_devices",
    "device_option",
    "devices_command",
    "find_device",
    "needs_static_shapes",
    "normalize_request",
    "plan_training",
    "probe_onnxruntime",
    "probe_openvino",
    "probe_torch",
    "select_inference_device",
]

_LAZY = {
    "compile_config": "devices.openvino_compile",
    "compile_model": "devices.openvino_compile",
    "needs_static_shapes": "devices.openvino_compile",
    "device_option": "devices.commands",
    "devices_command": "devices.commands",
}


def __getattr__(name: str):
    # click-based and OpenVINO helpers load on first use, so `import devices` stays minimal
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'devices' has no attribute {name!r}")
