"""Device records shared by every runtime probe, and `detect_devices()` which merges them.

Nothing here imports torch, openvino or onnxruntime: each probe module imports its runtime
inside its probe function, so `import devices` stays instant and works on a robot without torch.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class Runtime(str, Enum):
    TORCH = "torch"
    OPENVINO = "openvino"
    ONNXRUNTIME = "onnxruntime"


class Kind(str, Enum):
    CPU = "CPU"
    GPU = "GPU"
    NPU = "NPU"


class Use(str, Enum):
    TRAIN_HEAD = "train_head"
    EXTRACT_FEATURES = "extract_features"
    RUN_EXPORTED = "run_exported"
    FINETUNE_BACKBONE = "finetune_backbone"


@dataclass(frozen=True)
class Device:
    """One usable device as one runtime sees it; `id` is exactly what `--device` takes."""

    runtime: Runtime
    kind: Kind
    id: str
    name: str
    uses: tuple[Use, ...]
    precisions: tuple[str, ...] = ()
    static_shapes: bool = False  # NPUs compile for fixed input shapes only

    def to_json(self) -> dict:
        return {
            "runtime": self.runtime.value,
            "kind": self.kind.value,
            "id": self.id,
            "name": self.name,
            "uses": [use.value for use in self.uses],
            "precisions": list(self.precisions),
            "static_shapes": self.static_shapes,
        }


@dataclass(frozen=True)
class ProbeReport:
    """What one or more probes found; `problems` are one-line reasons a runtime misbehaved."""

    devices: list[Device] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ids(self) -> list[str]:
        return [device.id for device in self.devices]

    @staticmethod
    def merge(reports: Iterable[ProbeReport]) -> ProbeReport:
        devices: list[Device] = []
        problems: list[str] = []
        for report in reports:
            devices.extend(report.devices)
            problems.extend(report.problems)
        return ProbeReport(devices, problems)


def is_missing_package(error: BaseException, package: str) -> bool:
    """True when `error` means `package` itself is not installed (not a broken install)."""
    return isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == package


@contextlib.contextmanager
def torch_hidden(*also: str):
    """`import torch` (and of each module in `also`) fails inside this block unless this process
    has loaded it already.

    NNCF and onnxruntime import torch when it is installed, for interop that edgetune never uses:
    NNCF at import (its torch tensor backend) and in every quantize call (to ask whether the
    model is a torch one), onnxruntime in `onnxruntime.tools` (torch export helpers). Each takes
    an ImportError for "no torch". The import was 1.5-2.5 s of an int8 export (2-core AVX2).
    Only imports and NNCF run inside these blocks, and the modules import normally after them.
    """
    hidden = [name for name in ("torch", *also) if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # the import system's own "not importable" marker
    try:
        yield
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def import_runtime(package: str, *modules: str, importer: Callable[[str], object] | None = None):
    """Import a probe's runtime modules: (modules, None), or (None, report) when they cannot be.

    The one rule every probe follows: a package that is simply not installed means no devices and
    no problem; anything else (a broken install, a missing native library) is a reported problem.
    `importer(name)` replaces importlib.import_module where a runtime needs care to import.
    """
    import importlib

    importer = importer or importlib.import_module
    try:
        return [importer(m) for m in modules or (package,)], None
    except Exception as error:
        if is_missing_package(error, package):
            log.debug("%s is not installed: no %s devices", package, package)
            return None, ProbeReport([], [])
        problems: list[str] = []
        record_problem(problems, package, f"import {package}", error)
        return None, ProbeReport([], problems)


def record_problem(
    problems: list[str], runtime: str, what: str, error: BaseException
) -> None:
    """Record and log one probe failure; a failure is reported, never swallowed."""
    message = f"{runtime}: {what} failed: {type(error).__name__}: {error}".strip()
    message = " ".join(message.split())  # one line, even for multi-line native errors
    log.warning("%s", message)
    problems.append(message)


def cpu_name() -> str:
    """The CPU model name: /proc/cpuinfo on Linux, platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass  # not Linux: fall through to platform
    return platform.processor() or platform.machine() or "CPU"


# Instruction-set flags that decide how fast (and how exactly) OpenCV, OpenVINO and ONNX Runtime run:
# AVX-512/AMX bf16 units change fp32 compute, VNNI decides int16 saturation in u8 x s8 int8 kernels.
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c")
WIDE_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
SPEED_FLAGS = SIMD_FLAGS + WIDE_FLAGS
CPUINFO = "/proc/cpuinfo"


# ONEDNN_MAX_CPU_ISA caps the kernels of oneDNN, which OpenVINO's CPU plugin and PyTorch both run
# on: a flag above the cap is as good as absent, for speed and for numerics. It is how a robot's
# plain AVX2 CPU is reproduced on a workstation (benchmarks/bench_int8_cpus.py, bench_train.py).
_AVX512_BF16 = (*SIMD_FLAGS, "avx512f", "avx512_vnni", "avx512_bf16")
ISA_CAPS: dict[str, tuple[str, ...]] = {
    "SSE41": (),
    "AVX": ("sse4_2", "avx"),
    "AVX2": SIMD_FLAGS,
    "AVX2_VNNI": (*SIMD_FLAGS, "avx_vnni"),
    "AVX2_VNNI_2": (*SIMD_FLAGS, "avx_vnni"),
    "AVX512_CORE": (*SIMD_FLAGS, "avx512f"),
    "AVX512_CORE_VNNI": (*SIMD_FLAGS, "avx512f", "avx512_vnni"),
    "AVX512_CORE_BF16": _AVX512_BF16,
    "AVX512_CORE_FP16": (*_AVX512_BF16, "avx_vnni"),
    "AVX10_1_512": (*_AVX512_BF16, "avx_vnni"),
}


def isa_cap() -> str | None:
    """ONEDNN_MAX_CPU_ISA when it names a cap below AMX (None: no cap, or ALL / an AMX level)."""
    import os

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap if cap in ISA_CAPS else None


def cpu_flags(*, capped: bool = True) -> tuple[str, ...]:
    """The SPEED_FLAGS this CPU lists in /proc/cpuinfo (empty where there is none), less those
    above an ONEDNN_MAX_CPU_ISA cap (`capped=False`: all it lists)."""
    cap = isa_cap() if capped else None
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    present = set(value.split())
                    if cap is not None:
                        present &= set(ISA_CAPS[cap])
                    return tuple(f for f in SPEED_FLAGS if f in present)
    except OSError:
        pass
    return ()


def bf16_units() -> bool:
    """Whether OpenVINO may run fp32 models in bf16 here (AVX-512 bf16 or AMX, not capped)."""
    return any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's share), not the host's."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_cache: dict[tuple[Runtime, ...], ProbeReport] = {}
_cache_lock = threading.Lock()


def _probes() -> dict[Runtime, Callable[[], ProbeReport]]:
    from devices.openvino_probe import probe_openvino
    from devices.ort_probe import probe_onnxruntime
    from devices.torch_probe import probe_torch

    return {
        Runtime.TORCH: probe_torch,
        Runtime.OPENVINO: probe_openvino,
        Runtime.ONNXRUNTIME: probe_onnxruntime,
    }


def detect_devices(
    *, runtimes: Iterable[Runtime | str] | None = None, refresh: bool = False
) -> ProbeReport:
    """Every usable device of the given runtimes (default: all three), merged.

    The result is cached per process and per runtime set because importing the runtimes takes
    seconds; `refresh=True` probes again. Pass `runtimes=("openvino", "onnxruntime")` on a robot
    to avoid importing torch at all.
    """
    wanted = tuple(Runtime(r) for r in runtimes) if runtimes is not None else tuple(Runtime)
    with _cache_lock:
        if not refresh and wanted in _cache:
            return _cache[wanted]
    probes = _probes()
    reports = []
    for runtime in wanted:
        try:
            reports.append(probes[runtime]())
        except Exception as error:  # a bug in a probe must still show up in `edgetune devices`
            crashed: list[str] = []
            record_problem(crashed, runtime.value, "probe", error)
            reports.append(ProbeReport([], crashed))
    report = ProbeReport.merge(reports)
    with _cache_lock:
        _cache[wanted] = report
    return report
