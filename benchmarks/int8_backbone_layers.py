"""Which layers of the int8 training backbone part its features from fp32.

    python benchmarks/int8_backbone_layers.py [--datasets hymenoptera caltech50] [--no-write]

Every variant is NNCF on the same 300 generated calibration views (toolkit.features.calibration_views)
with edgetune's settings (toolkit.features.nncf_int8), and differs only in which convolutions read
float instead of int8 inputs. For each, on the TRAINING images of each set (clean eval views; val is
never read): the mean centred cosine between its features and fp32's per image, and the 5-fold CV
accuracy of logistic regression and imprint (their settings by CV) on those features; and its batch-8
throughput against fp32's, timed in turns (3 rounds x 2 s, medians). Run it with
ONEDNN_MAX_CPU_ISA=AVX2 (or on a plain AVX2 CPU) to see what a robot-class CPU computes. Rewrites the
"## int8 training backbone: layers" section of BENCHMARKS.md (with the ISA suffix under a cap).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATASETS as SHARED  # noqa: E402
from benchmarks._common import isa_section, load_average, run_header, update_benchmarks_md  # noqa: E402

SECTION = "int8 training backbone: layers"


def training_views(name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from toolkit.data import discover
    from toolkit.preprocess import model_input

    train = discover(SHARED / name, val_fraction=0.2, seed=0).train
    views = [model_input(sample.path, size) for sample in train.samples]
    return np.stack(views), np.asarray([sample.label for sample in train.samples])


def variants(fp32):
    """name -> (quantize(model, batches)): NNCF with float inputs to the named convolutions. The
    single-layer variants of 2026-12-07 (stem, head conv, last block, last depthwise) are kept in
    BENCHMARKS.md under "Earlier"."""
    from toolkit.convert import load_nncf
    from toolkit.features import _int8_weights, backbone_int8, nncf_int8

    nncf = load_nncf()
    depthwise = [op.get_friendly_name() for op in fp32.get_ordered_ops() if op.get_type_name() == "GroupConvolution"]

    def v3(m, b):
        scope = nncf.IgnoredScope(types=["GroupConvolution"], validate=False)
        return _int8_weights(nncf_int8(m, b, ignored_scope=scope), "GroupConvolution")

    return {
        "every layer int8 (recipe v2)": lambda m, b: nncf_int8(m, b),
        "every depthwise float": lambda m, b: nncf_int8(m, b, ignored_scope=nncf.IgnoredScope(names=depthwise)),
        "every depthwise reads float, int8 weights (recipe v3)": v3,
        "v3 + stem and first two blocks read float (recipe v4, default)": backbone_int8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera", "caltech50"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    t0, start_load = time.perf_counter(), load_average()

    from devices.openvino_compile import compile_model
    from toolkit.backbones import get_spec
    from toolkit.features import _openvino_backbone, calibration_views, centred_cosines
    from toolkit.head_fit import cross_validate
    from toolkit.runtime import to_nchw_float

    spec = get_spec("efficientnet_lite1")
    fp32 = _openvino_backbone(spec, "fp32", None)
    sets = {name: training_views(name, spec.input_size) for name in args.datasets}
    calibration = [to_nchw_float(v[None]) for v in calibration_views(spec.input_size)]

    def features(model, views):
        compiled = compile_model(model, "CPU", exact=True)
        return np.concatenate([compiled(to_nchw_float(views[i:i + 16]))[0]
                               for i in range(0, len(views), 16)]).astype(np.float32)

    def cv(feats, labels):
        res = cross_validate(["logreg", "imprint"], feats[:, None], labels, int(labels.max()) + 1, folds=5, seed=0)
        return {h: max(c.accuracy for c in res.candidates if c.name == h) for h in ("logreg", "imprint")}

    models = {"fp32": fp32}
    for name, quantize in variants(fp32).items():
        models[name] = quantize(fp32, calibration)
        print(f"quantized: {name}", flush=True)
    reference = {n: features(fp32, v) for n, (v, _) in sets.items()}
    compiled = {name: compile_model(m, "CPU") for name, m in models.items()}
    batch = to_nchw_float(next(iter(sets.values()))[0][:8])
    speed: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(3):
        for name, c in compiled.items():
            c(batch)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 2:
                c(batch)
                n += 8
            speed[name].append(n / (time.perf_counter() - start))
    fp32_speed = float(np.median(speed["fp32"]))

    header = ["variant", "img/s (x fp32)"]
    for n in sets:
        header += [f"{n}: cosine", f"{n}: CV logreg / imprint"]
    rows = []
    for name, model in models.items():
        ips = float(np.median(speed[name]))
        cells = [name, f"{ips:.0f} ({ips / fp32_speed:.2f}x)"]
        for n, (views, labels) in sets.items():
            f = reference[n] if name == "fp32" else features(model, views)
            acc = cv(f, labels)
            cells += ["1" if name == "fp32" else f"{centred_cosines(reference[n], f).mean():.4f}",
                      f"{acc['logreg']:.4f} / {acc['imprint']:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    lines = [*run_header(start_load, t0), "",
             "Training images only, clean eval views (val never read). cosine: mean centred cosine to fp32's "
             "features per image; CV: 5-fold, each head's settings by CV. Every variant is NNCF on the same 300 "
             "generated views; they differ only in which convolutions read float inputs.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows]
    print("\n".join(lines))
    if not args.no_write:
        update_benchmarks_md(isa_section(SECTION), "\n".join(lines))


if __name__ == "__main__":
    main()
