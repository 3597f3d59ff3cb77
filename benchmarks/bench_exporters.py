"""Exporters on ants/bees: int8 accuracy drop, fp parity, OpenVINO int8 vs fp32 latency, file sizes.

    python benchmarks/bench_exporters.py [--run RUN_DIR] [--runs 300]

Trains a default run on ../shared/datasets/hymenoptera (or reuses --run), exports every format,
prints a table and replaces the "## Exporters" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import command_line, default_run, load_average, machine_description, update_benchmarks_md  # noqa: E402

MAX_DROP = 0.5  # the int8 budget, in accuracy points


def latency_ms(xml: Path, runs: int, *, precise: bool, size: int) -> float:
    from toolkit.benchmark import synthetic_input, time_calls
    from toolkit.runtime import openvino_runner

    run = openvino_runner(xml, latency=True, precise=precise)
    x = synthetic_input(size)
    return float(np.median(time_calls(lambda: run(x), runs, warmup=20)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, help="reuse a trained run instead of training a default one")
    ap.add_argument("--runs", type=int, default=300, help="latency repetitions")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from exporters import export, list_formats

    start_load = load_average()
    run = default_run(args.run, "bench-exporters-")
    jobs = {fmt: {} for fmt in list_formats()}
    jobs["openvino --fp32"] = {"fmt": "openvino", "fp32": True}
    for fmt in ("onnx-int8", "openvino-int8"):
        jobs[f"{fmt} --max-drop {MAX_DROP}"] = {"fmt": fmt, "max_drop": MAX_DROP}
    results, seconds = {}, {}
    for label, job in jobs.items():
        fmt = job.pop("fmt", label)
        t = time.perf_counter()
        results[label] = export(run, fmt, run / "exports" / label.replace(" ", "_"), **job)
        seconds[label] = time.perf_counter() - t
    onnx_size = results["onnx"].files["model.onnx"]

    def model_size(r) -> int:
        return sum(n for f, n in r.files.items() if f.startswith("model.") or f == "inference.onnx")

    def verdict(label: str, r) -> str:
        p, precision = r.parity, r.manifest["precision"]
        if precision == "int8":
            ok = p["accuracy_drop_points"] <= MAX_DROP and model_size(r) <= 0.3 * onnx_size
        else:
            ok = p["agreement"] == 1.0 and (precision != "fp32" or p["max_abs_diff"] <= 1e-3)
        return "pass" if ok else "FAIL"

    rows = []
    for label, r in results.items():
        p = r.parity
        rows.append((label, r.manifest["precision"], f"{p['export_accuracy']:.2%}", f"{p['accuracy_drop_points']:+.2f}",
                     f"{p['agreement']:.2%}", f"{p['max_abs_diff']:.1e}", f"{model_size(r) / 1e6:.2f} MB",
                     f"{model_size(r) / onnx_size:.2f}", f"{seconds[label]:.0f} s", verdict(label, r)))
    ov32, ov8 = results["openvino --fp32"].model, results["openvino-int8"].model
    size = results["onnx"].manifest["input"]["size"]
    lat = {
        "fp32 IR (fp32 compute)": latency_ms(ov32, args.runs, precise=True, size=size),
        "fp32 IR (CPU default precision: bf16 where the CPU has it)": latency_ms(ov32, args.runs, precise=False, size=size),
        "int8 IR": latency_ms(ov8, args.runs, precise=False, size=size),
    }
    head = ("export", "precision", "val acc", "drop (pts)", "top-1 agree", "max |dlogit|", "model size",
            "x fp32 ONNX", "export time", "target")
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    lat_lines = [f"| {k} | {v:.2f} ms | {lat['int8 IR'] / v:.2f} | {'pass' if lat['int8 IR'] / v <= 0.6 else 'FAIL'} |"
                 for k, v in lat.items() if k != "int8 IR"]
    source = results["onnx"].parity["source_accuracy"]
    section = "\n".join([
        f"`{command_line()}`; {machine_description()}; load average {start_load} at start, {load_average()} at end.",
        "",
        f"Default run (TrainConfig(): {results['onnx'].manifest['backbone']['name']}) on ants/bees, source val "
        f"accuracy {source:.2%} on {results['onnx'].parity['n']} val images. Every export is checked at export "
        "time against the source model on the val images (OpenVINO in fp32 compute for the check).",
        "",
        *table,
        "",
        f"OpenVINO batch-1 latency (LATENCY hint, median of {args.runs} runs), target int8 <= 0.6x the fp32 IR:",
        "",
        "| fp32 IR | median | int8 IR / this | target |",
        "|---|---|---|---|",
        *lat_lines,
        f"| (int8 IR itself) | {lat['int8 IR']:.2f} ms | | |",
        "",
        f"Targets (issue 3): int8 drop <= {MAX_DROP} points and file <= 0.3x the fp32 ONNX; fp32/fp16 100% "
        "top-1 agreement, max |dlogit| <= 1e-3 (fp32). `--max-drop` rows are the documented way to hold "
        "the budget: onnxruntime quantization first, NNCF accuracy control only when it is over.",
    ])
    print("## Exporters\n\n" + section)
    update_benchmarks_md("Exporters", section)


if __name__ == "__main__":
    main()
