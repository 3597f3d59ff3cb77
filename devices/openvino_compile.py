"""Compiling OpenVINO models for a device: model cache, performance hint, NPU static shapes.

NPU and GPU plugins take seconds to minutes to compile a model; with CACHE_DIR set the compiled
blob is stored, so a robot's second start loads it instead of compiling again.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from devices.probe import Device, Kind, Runtime, bf16_units, isa_cap
from toolkit.errors import DeviceError

log = logging.getLogger(__name__)


def edgetune_cache_dir() -> Path:
    """Per-user cache root: $XDG_CACHE_HOME/edgetune or ~/.cache/edgetune.

    Only read from the environment, never written; folders are created when first used.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgetune"


def default_cache_dir() -> Path:
    """Compiled-model cache (OpenVINO CACHE_DIR): a robot's second start skips compilation."""
    return edgetune_cache_dir() / "ov_cache"


def ov_device_name(device: Device | str) -> str:
    """'openvino:GPU.0' / Device -> 'GPU.0'; a bare OpenVINO name ('NPU') passes through."""
    if isinstance(device, Device):
        if device.runtime is not Runtime.OPENVINO:
            raise DeviceError(f"Device '{device.id}' is not an OpenVINO device; use an openvino:* device.")
        device = device.id
    name = device.split(":", 1)[1] if device.lower().startswith("openvino:") else device
    if not name or ":" in name:
        raise DeviceError(
            f"Device '{device}' is not an OpenVINO device; use openvino:CPU, openvino:GPU or openvino:NPU."
        )
    return name.upper()


def _kind(device: Device | str) -> str:
    if isinstance(device, Device):
        return device.kind.value
    return ov_device_name(device).split(".")[0]


def needs_static_shapes(device: Device | str) -> bool:
    """NPUs compile for fixed input shapes only."""
    if isinstance(device, Device):
        return device.static_shapes
    return _kind(device) == Kind.NPU.value


def compile_config(
    device: Device | str, *, cache_dir: Path | None = None, latency: bool = False, exact: bool = False
) -> dict[str, Any]:
    """Properties for `core.compile_model(model, name, config)` on this device.

    THROUGHPUT for feature extraction (batches, all cores or NPU tiles busy), LATENCY for predict
    (one image at a time); fp16 inference on NPUs that list it (the NPU's native precision).
    exact=True asks for f32 compute: CPUs with bf16 units otherwise run fp32 models in bf16,
    which is right for speed but not for checking an export against its source.
    """
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    ov_device_name(device)  # refuses non-OpenVINO devices with a clear message
    mode = hints.PerformanceMode.LATENCY if latency else hints.PerformanceMode.THROUGHPUT
    config: dict[str, Any] = {
        props.cache_dir(): str(cache_dir if cache_dir is not None else default_cache_dir()),
        hints.performance_mode(): mode,
    }
    if _kind(device) == Kind.NPU.value:
        precisions = device.precisions if isinstance(device, Device) else ("fp16",)
        if "fp16" in precisions:
            config[hints.inference_precision()] = ov.Type.f16
    if exact or (_kind(device) == Kind.CPU.value and isa_cap() is not None and not bf16_units()):
        # Under an ISA cap OpenVINO still reads bf16 units from CPUID and picks bf16 compute, which
        # the capped kernels lack (OpenVINO 2026.4 segfaults compiling an fp32 model so).
        config[hints.inference_precision()] = ov.Type.f32
    return config


def with_static_batch(model, batch: int | None):
    """A copy of `model` with every input fixed to [batch, ...]; DeviceError when other dims are dynamic."""
    import openvino as ov

    shapes = {}
    for port in model.inputs:
        partial = port.get_partial_shape()
        dims = list(partial)
        if dims and (batch is not None or dims[0].is_dynamic):
            dims[0] = ov.Dimension(batch or 1)
        if any(dim.is_dynamic for dim in dims):
            raise DeviceError(
                f"Input '{port.any_name}' has shape {partial}; an NPU needs every dimension but the "
                f"batch fixed. Export the model with a fixed image size."
            )
        shapes[port.any_name] = ov.PartialShape(dims)
    if all(model.input(name).get_partial_shape() == shape for name, shape in shapes.items()):
        return model
    static = model.clone()  # never reshape the caller's model behind its back
    static.reshape(shapes)
    return static


def optimal_requests(compiled) -> int:
    """How many infer requests keep every stream of `compiled` busy (its OPTIMAL_NUMBER_OF_INFER_REQUESTS)."""
    return max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))


def compile_model(
    model,
    device: Device | str,
    *,
    batch: int | None = None,
    cache_dir: Path | None = None,
    latency: bool = False,
    exact: bool = False,
    core=None,
):
    """Compile an OpenVINO model (ov.Model or a path to IR/ONNX) for `device` and return the CompiledModel.

    Devices that need static shapes (NPU) get inputs fixed to [batch or 1, ...] first.
    """
    import openvino as ov

    core = core if core is not None else ov.Core()
    if isinstance(model, (str, Path)):
        model = core.read_model(str(model))
    if needs_static_shapes(device):
        model = with_static_batch(model, batch)
    config = compile_config(device, cache_dir=cache_dir, latency=latency, exact=exact)
    name = ov_device_name(device)
    try:
        Path(config["CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home on a robot: the cache only saves compile time
        log.info("no compiled-model cache (%s): compiling without one", e)
        config.pop("CACHE_DIR")
    log.info("compiling for openvino:%s with %s", name, {k: str(v) for k, v in config.items()})
    try:
        return core.compile_model(model, name, config)
    except RuntimeError as e:
        if "CACHE_DIR" not in config or not _cache_race(e):
            raise
        # Two processes writing the same blob into an empty cache at once (OpenVINO renames it into
        # place, and the loser's chmod finds it gone): compile again without the cache.
        log.info("compiled-model cache busy (%s): compiling without it", e)
        config.pop("CACHE_DIR")
        return core.compile_model(model, name, config)


def _cache_race(error: RuntimeError) -> bool:
    text = str(error)
    return ".blob" in text or "cache" in text.lower()
