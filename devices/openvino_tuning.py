"""Feature-engine settings measured on this machine, not constants tuned on one CPU.

The best batch size and performance hint for a frozen backbone differ from CPU to CPU: on a
bf16/AVX-512 machine small batches under the THROUGHPUT hint win, on a plain AVX2 machine other
settings may. The first time a model runs on a device, a few candidates are timed on synthetic
input for a fraction of a second each (after one warm-up batch) and the fastest is kept in the
user cache, keyed by the CPU (model, flags, cores), the OpenVINO version, the device and the
model, so every later run starts at once with the same choice.

The same cache holds how fast a backbone runs at each precision (`precision_speed`), which
`--backbone-precision auto` reads: int8 pays off on some CPUs and not on others (one computing
fp32 models in bf16 may match it), so that too is measured, never assumed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from devices.openvino_compile import edgetune_cache_dir, optimal_requests

log = logging.getLogger(__name__)

HINTS = ("THROUGHPUT", "LATENCY")
BATCHES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class EngineSettings:
    hint: str  # OpenVINO PERFORMANCE_HINT the model is compiled with
    batch: int  # images per infer request
    images_per_second: float  # what the tuning measured for this choice
    measured: str  # when, for `-v` and the cache file


def tuning_file() -> Path:
    return edgetune_cache_dir() / "engine_tuning.json"


def machine_key() -> str:
    """What makes timings on one machine valid on another: CPU model, the flags that matter, cores."""
    from devices.probe import cpu_flags, cpu_name, isa_cap, usable_cores

    cap = isa_cap()  # a capped workstation is not the plain AVX2 CPU its flags now read like
    return f"{cpu_name()} [{' '.join(cpu_flags())}] x{usable_cores()}" + (f" ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def _load() -> dict[str, Any]:
    try:
        return json.loads(tuning_file().read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a missing or damaged cache only costs one more measurement


def _store(key: str, entry: dict[str, Any]) -> None:
    table = _load()
    table[key] = entry
    path = tuning_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tuning-")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # concurrent runs: last writer wins, each file whole
    except OSError as e:
        log.warning("Could not save engine tuning to %s (%s); it will be measured again next time.", path, e)


def images_per_second(compiled, make_batch: Callable[[int], np.ndarray], batch: int, seconds: float) -> float:
    """Throughput of `compiled` fed `batch`-image requests, all its optimal requests in flight."""
    n = optimal_requests(compiled)
    requests = [compiled.create_infer_request() for _ in range(n)]
    x = make_batch(batch)
    requests[0].infer({0: x})  # warm-up: first-inference allocations are not throughput
    done, started = 0, time.perf_counter()
    for r in requests:
        r.start_async({0: x})
    i = 0
    while time.perf_counter() - started < seconds:
        requests[i].wait()
        done += batch
        requests[i].start_async({0: x})
        i = (i + 1) % n
    for r in requests:
        r.wait()
    done += n * batch
    return done / (time.perf_counter() - started)


def tuned_settings(
    model_key: str,
    compile_for: Callable[[str], Any],
    make_batch: Callable[[int], np.ndarray],
    *,
    batches: Iterable[int] | None = None,
    seconds: float = 0.4,
    retune: bool = False,
) -> EngineSettings:
    """The cached best (hint, batch) for `model_key` on this machine, measured on first use.

    `compile_for(hint)` returns a CompiledModel with dynamic batch for that performance hint;
    `make_batch(n)` an input batch of n images.
    """
    import openvino as ov

    key = f"{machine_key()} | openvino {ov.__version__.split('-')[0]} | {model_key}"
    cached = None if retune else _load().get(key)
    if cached:
        try:
            settings = EngineSettings(**cached)
            log.info("Engine settings for %s (measured %s): %s hint, batch %d, %.0f img/s", model_key,
                     settings.measured, settings.hint, settings.batch, settings.images_per_second)
            return settings
        except TypeError:
            pass  # written by another version: measure again
    t0 = time.perf_counter()
    results = []
    for hint in HINTS:
        compiled = compile_for(hint)
        for b in batches or BATCHES:
            results.append((images_per_second(compiled, make_batch, b, seconds), hint, b))
        del compiled
    best = max(results)
    settings = EngineSettings(best[1], best[2], round(best[0], 1), time.strftime("%Y-%m-%d"))
    table = ", ".join(f"{h[0]}{b}: {r:.0f}" for r, h, b in results)
    log.info("Tuned %s in %.1f s (img/s by T=THROUGHPUT/L=LATENCY hint and batch: %s): %s hint, batch %d",
             model_key, time.perf_counter() - t0, table, settings.hint, settings.batch)
    _store(key, asdict(settings))
    return settings


@dataclass(frozen=True)
class PrecisionSpeed:
    images_per_second: dict[str, float]  # precision -> img/s, each at its own tuned hint and batch
    measured: str

    def speedup(self, fast: str = "int8", base: str = "fp32") -> float:
        return self.images_per_second[fast] / self.images_per_second[base]


def precision_speed(
    model_key: str,
    make_timers: Callable[[], dict[str, Callable[[float], float]]],
    *,
    rounds: int = 3,
    seconds: float = 0.5,
    retune: bool = False,
) -> PrecisionSpeed:
    """Images/s of one backbone at each precision on this machine, measured on first use and cached.

    `make_timers()` (called only when there is no cached measurement) returns precision -> a
    function that runs that engine for the given seconds and returns its images/s. The
    precisions take turns for `rounds` rounds and each keeps its median, so load from other
    processes weighs on all of them alike: the ratio, not the absolute speed, decides.
    """
    import openvino as ov

    key = f"{machine_key()} | openvino {ov.__version__.split('-')[0]} | {model_key} | precision speed"
    cached = None if retune else _load().get(key)
    if cached:
        try:
            speed = PrecisionSpeed(**cached)
            log.info("Backbone speed by precision for %s (measured %s): %s", model_key, speed.measured,
                     ", ".join(f"{p} {v:.0f} img/s" for p, v in speed.images_per_second.items()))
            return speed
        except TypeError:
            pass  # written by another version: measure again
    timers = make_timers()
    samples: dict[str, list[float]] = {p: [] for p in timers}
    for _ in range(rounds):
        for precision, timer in timers.items():
            samples[precision].append(timer(seconds))
    speed = PrecisionSpeed({p: round(float(np.median(v)), 1) for p, v in samples.items()}, time.strftime("%Y-%m-%d"))
    log.info("Timed %s by precision (medians of %d interleaved rounds): %s", model_key, rounds,
             ", ".join(f"{p} {v:.0f} img/s" for p, v in speed.images_per_second.items()))
    _store(key, asdict(speed))
    return speed
