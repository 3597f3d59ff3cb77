"""OpenVINO devices: Core().available_devices with FULL_DEVICE_NAME and OPTIMIZATION_CAPABILITIES."""

from __future__ import annotations

import logging

from devices.probe import Device, Kind, ProbeReport, Runtime, Use, import_runtime, record_problem

log = logging.getLogger(__name__)

OPENVINO_USES = (Use.EXTRACT_FEATURES, Use.RUN_EXPORTED)

# OPTIMIZATION_CAPABILITIES -> edgetune precision names, in a stable order.
_PRECISIONS = {"FP32": "fp32", "FP16": "fp16", "BF16": "bf16", "INT8": "int8"}


def ov_kind(ov_name: str) -> Kind | None:
    """'CPU' -> CPU, 'GPU' / 'GPU.1' -> GPU, 'NPU' -> NPU; anything else is not a device we use."""
    base = ov_name.split(".")[0].upper()
    return {"CPU": Kind.CPU, "GPU": Kind.GPU, "NPU": Kind.NPU}.get(base)


def probe_openvino() -> ProbeReport:
    """Every OpenVINO device here; empty only when openvino is not installed."""
    problems: list[str] = []
    modules, failed = import_runtime("openvino", "openvino", "openvino.properties.device")
    if failed is not None:
        return failed
    ov, device_props = modules

    try:
        core = ov.Core()
        names = list(core.available_devices)
    except Exception as error:
        record_problem(problems, "openvino", "Core()", error)
        return ProbeReport([], problems)

    devices = []
    for ov_name in names:
        kind = ov_kind(ov_name)
        if kind is None:
            log.info("openvino: skipping device %s (not a CPU, GPU or NPU)", ov_name)
            continue
        full_name = ov_name
        precisions: tuple[str, ...] = ()
        try:
            full_name = str(core.get_property(ov_name, device_props.full_name()))
            capabilities = set(core.get_property(ov_name, device_props.capabilities()))
            precisions = tuple(ours for theirs, ours in _PRECISIONS.items() if theirs in capabilities)
        except Exception as error:  # list the device anyway: the problem line says what is off
            record_problem(problems, "openvino", f"reading properties of {ov_name}", error)
        devices.append(
            Device(
                Runtime.OPENVINO,
                kind,
                f"openvino:{ov_name}",
                full_name,
                OPENVINO_USES,
                precisions,
                static_shapes=kind is Kind.NPU,
            )
        )
    return ProbeReport(devices, problems)
