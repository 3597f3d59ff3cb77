"""int8 backbones across CPUs: does the int8 file keep its accuracy on a CPU without VNNI?

    python benchmarks/bench_int8_cpus.py [--run NAME=RUN_DIR ...] [--no-write]

x86 CPUs without VNNI multiply u8 x s8 in pairs summed into int16, which saturates; with VNNI the
same file never saturates. This script quantizes each run's backbone with each NNCF recipe and
runs the int8 backbone twice, in two child processes: on the CPU's own ISA and with oneDNN held to
AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, honoured by OpenVINO's CPU plugin): an AVX2 robot board emulated on
this host. Measured on TRAINING images only: half of each class's training images is the pool
(calibration: a stratified <= 300 of it; the run's selected head is refit on its fp32 features),
the other half (<= 500) is held out and scored by top-1 agreement of the head on int8 features with
the head on fp32 features (what the export budget gates), and by the centred cosine of the features.
Without --run it trains default runs of ../shared/datasets/hymenoptera and caltech50 in a temp dir.
Writes the "int8 across CPUs" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATASETS as SHARED  # noqa: E402
from benchmarks._common import command_line, load_average, machine_description, update_benchmarks_md  # noqa: E402

RECIPES = {
    "8-bit weights everywhere (overflow fix off)": "DISABLE",
    "7-bit first layer (NNCF's default; edgetune int8 recipe v1)": "FIRST_LAYER",
    "7-bit every layer (edgetune's recipe v2)": "ENABLE",
    "7-bit; depthwise layers, stem and first two blocks reading float inputs (recipe v4, the default)": "default",
}


def child(run_dir: Path) -> list[dict]:
    """One ISA (this process's environment): every recipe on one run."""
    import openvino as ov

    from benchmarks.bench_int8 import heldout_split, refit_selected_head
    from exporters.base import MAX_CALIBRATION, stratified_subset
    from toolkit.convert import nncf_session
    from toolkit.features import _openvino_backbone, backbone_int8, float_input
    from toolkit.head_fit import head_logits
    from toolkit.runs import RunDir

    run = RunDir.open(run_dir)
    labels, pool, held, pool_x, held_x = heldout_split(run, 500)
    calib_pos = stratified_subset([labels[i] for i in pool], MAX_CALIBRATION)
    core = ov.Core()

    def feats(model, x):  # f32 compute for the float parts: bf16 would hide what int8 does
        c = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.concatenate([c(x[i:i + 16])[0] for i in range(0, len(x), 16)]).astype(np.float64)

    backbone = float_input(_openvino_backbone(run.spec, "fp32", None))
    f_pool, f_held = feats(backbone, pool_x), feats(backbone, held_x)
    y_pool = np.array([labels[i] for i in pool])
    head = refit_selected_head(run, f_pool, y_pool)
    target = head_logits(head, f_held).argmax(1)
    centre = f_pool.mean(0)
    rows = []
    for label, fix in RECIPES.items():
        t = time.perf_counter()
        calibration = [pool_x[i:i + 1] for i in calib_pos]
        if fix == "default":
            q = backbone_int8(backbone, calibration)
        else:
            with nncf_session() as nncf:
                q = nncf.quantize(backbone, nncf.Dataset(calibration), subset_size=len(calib_pos),
                                  fast_bias_correction=True,
                                  advanced_parameters=nncf.AdvancedQuantizationParameters(
                                      overflow_fix=getattr(nncf.OverflowFix, fix)))
        seconds = time.perf_counter() - t
        q_held = feats(q, held_x)
        a, b = f_held - centre, q_held - centre
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        rows.append({"recipe": label, "agreement": float((head_logits(head, q_held).argmax(1) == target).mean()),
                     "cosine": float(cos.mean()), "held": len(held), "calibration": len(calib_pos),
                     "head": f"{head.name} {head.options}", "quantize_seconds": round(seconds, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def default_runs(work: Path) -> dict[str, Path]:
    from toolkit.train import TrainConfig, train

    runs = {}
    for name, folder in (("ants/bees", "hymenoptera"), ("caltech50", "caltech50")):
        runs[name] = work / folder
        if not (runs[name] / "metrics.json").exists():
            train(SHARED / folder, runs[name], TrainConfig())
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeatable) [default runs of both sets]")
    ap.add_argument("--work", type=Path, help="where default runs are trained [a temp dir]")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    from exporters.base import MAX_CALIBRATION

    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        runs = dict(r.split("=", 1) for r in args.run) if args.run else default_runs(args.work or Path(tmp))
        rows = []
        for name, run_dir in runs.items():
            for isa in ("native", "AVX2"):
                env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
                if isa != "native":
                    env["ONEDNN_MAX_CPU_ISA"] = isa
                out = subprocess.run([sys.executable, __file__, "--child", str(run_dir)], env=env, check=True,
                                     capture_output=True, text=True).stdout
                rows += [{"run": name, "isa": isa, **r} for r in json.loads(out.strip().splitlines()[-1])]
                print(f"{name} {isa} done", flush=True)
    lines = [f"`{command_line()}`; {machine_description()}; load average {load_start} at start, {load_average()} at end.",
             "",
             f"Each run's backbone quantized by NNCF (performance preset, fast bias correction, {MAX_CALIBRATION} stratified training "
             "images), with each recipe (three weight recipes, and edgetune's recipe v4: 7-bit weights with the depthwise layers, their weights int8, and the stem and first two blocks reading float inputs); the int8 backbone then runs on this CPU's own ISA and with oneDNN held to "
             "AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`: a robot CPU without VNNI, emulated). Scored on held-out TRAINING images "
             "(half of each class; the run's head refit on the other half's fp32 features): top-1 agreement of that head "
             "on int8 vs fp32 features, and the mean centred cosine between the two feature vectors.",
             "",
             "| run | recipe | agreement, this CPU | agreement, AVX2 | cosine, this CPU | cosine, AVX2 | held-out images |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["run"] for r in rows):
        for recipe in RECIPES:
            by = {r["isa"]: r for r in rows if r["run"] == name and r["recipe"] == recipe}
            n, a = by["native"], by["AVX2"]
            lines.append(f"| {name} | {recipe} | {n['agreement']:.2%} | {a['agreement']:.2%} | {n['cosine']:.4f} | "
                         f"{a['cosine']:.4f} | {n['held']} |")
    text = "\n".join(lines)
    print("\n" + text)
    if not args.no_write:
        update_benchmarks_md("int8 across CPUs", text)


if __name__ == "__main__":
    main()
