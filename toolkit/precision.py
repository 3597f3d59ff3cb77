"""`--backbone-precision auto`: the int8 backbone where it pays on this machine, fp32 elsewhere.

int8 is chosen when both hold, each measured once per machine and cached in the user cache:
  - speed: the int8 backbone runs at least SPEEDUP_BAR x the fp32 one's images/s on the feature
    device (devices.openvino_tuning.precision_speed: both engines at their own tuned settings,
    timed in turns);
  - fidelity: its features follow fp32 on generated probe scenes with a mean (centred) cosine of
    at least FIDELITY_BAR (measured when the backbone was quantized, toolkit.features.int8_fidelity).
The fidelity rule stands in for "CV accuracy on int8 features within 0.3 points of fp32", which
would need fp32 features too and so cost the time int8 saves; benchmarks/bench_precision.py
measures both on ants/bees and caltech50 (BENCHMARKS.md, "Training: backbone precision").
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SPEEDUP_BAR = 1.5  # issue 10: int8 must be at least this much faster to be worth a second backbone
FIDELITY_BAR = 0.97  # above every Lite1 int8 backbone measured to lose > 0.3 CV points (BENCHMARKS.md)


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str
    precision: str
    reason: str
    speedup: float | None = None  # int8 images/s over fp32 images/s, as measured on this machine
    feature_cosine: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def choose_backbone_precision(requested: str, backbone: str, plan, *, unfreeze: bool = False) -> PrecisionChoice:
    """The backbone precision a run uses: `requested` itself unless it is "auto"."""
    if requested != "auto":
        return PrecisionChoice(requested, requested, f"asked for (--backbone-precision {requested})")
    if unfreeze:
        return PrecisionChoice("auto", "fp32", "--unfreeze fine-tunes the backbone in torch fp32")
    device = plan.features
    if device.runtime.value != "openvino":
        return PrecisionChoice("auto", "fp32", f"features run on {device.id}; the int8 backbone needs OpenVINO")
    from toolkit.backbones import get_spec
    from toolkit.features import cached_int8_backbone, int8_backbone_record

    name = device.id.partition(":")[2]
    speed = measure_speed(backbone, name)
    ratio = round(speed.speedup(), 2)
    ips = speed.images_per_second
    timing = f"int8 {ips['int8']:.0f} vs fp32 {ips['fp32']:.0f} img/s on {device.id} (measured {speed.measured})"
    if ratio < SPEEDUP_BAR:
        return PrecisionChoice("auto", "fp32", f"int8 is only {ratio:.2f}x fp32 here, below {SPEEDUP_BAR}x: {timing}",
                               speedup=ratio)
    spec = get_spec(backbone)
    cached_int8_backbone(spec)  # made by the speed measurement; again only if since cleared or outdated
    cosine = int8_backbone_record(spec).get("feature_cosine")
    if cosine is None or cosine < FIDELITY_BAR:
        shown = "not measured" if cosine is None else f"{cosine:.3f}"
        return PrecisionChoice("auto", "fp32", f"int8 is {ratio:.2f}x fp32 ({timing}) but its features follow fp32 "
                               f"with cosine {shown}, below {FIDELITY_BAR}", speedup=ratio, feature_cosine=cosine)
    return PrecisionChoice("auto", "int8", f"int8 is {ratio:.2f}x fp32 (>= {SPEEDUP_BAR}x: {timing}) and its features "
                           f"follow fp32 with cosine {cosine:.3f} (>= {FIDELITY_BAR})", speedup=ratio,
                           feature_cosine=cosine)


def measure_speed(backbone: str, device: str):
    """fp32 and int8 images/s of `backbone` on OpenVINO `device`: cached per machine; the first
    time, both engines are built (quantizing the int8 backbone once) and timed in turns."""
    from devices.openvino_tuning import images_per_second, precision_speed

    def make_timers():
        from toolkit.features import create_engine

        engines = {p: create_engine(backbone, "openvino", device, precision=p) for p in ("fp32", "int8")}
        size = engines["fp32"].spec.input_size
        rng = np.random.default_rng(0)

        def make_batch(n: int) -> np.ndarray:
            return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)

        return {p: (lambda seconds, e=e: images_per_second(e.compiled, make_batch, e.batch, seconds))
                for p, e in engines.items()}

    return precision_speed(speed_key(device, backbone), make_timers)


def speed_key(device: str, backbone: str) -> str:
    """What a speed measurement is cached under; the int8 recipe is part of it, because a new
    recipe is a different int8 backbone to time."""
    from toolkit.features import INT8_RECIPE

    return f"{device} | {backbone} | int8 {INT8_RECIPE}"
