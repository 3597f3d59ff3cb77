"""`edgetune benchmark` against the runtimes' own tools on the same model files.

    python benchmarks/bench_runtime.py [--run RUN_DIR] [--rounds 3] [--seconds 8]

Trains a default ants/bees run (or reuses --run), exports openvino (fp32), openvino-int8, onnx and
onnx-int8, then for each bundle alternates, round after round: `edgetune benchmark`'s measurement,
OpenVINO's benchmark_app (-hint latency, then -hint throughput, batch 1) on the same .xml/.onnx, and
for ONNX bundles a bare onnxruntime session loop. Medians over rounds; the latency target is judged
on each round's ratio (their median), so load that drifts between rounds on a shared machine
cancels. Also shows the pre-fix measurement (a model compiled for throughput with a dynamic batch,
driven by one request), which is what `edgetune benchmark` reported before. Replaces the
"## Runtime latency" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path


if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (Row, command_line, default_run, load_average, machine_description, markdown_table,  # noqa: E402
                                isa_section, median, print_table, update_benchmarks_md)

TOLERANCE = 0.10  # the target: p50 within 10% of benchmark_app -hint latency
BUNDLES = {"openvino fp32": ("openvino", {"fp32": True}), "openvino-int8": ("openvino-int8", {}),
           "onnx fp32": ("onnx", {}), "onnx-int8": ("onnx-int8", {})}


def benchmark_app(model: Path, size: int, *, hint: str, seconds: int) -> dict[str, float]:
    """OpenVINO's benchmark_app (the copy installed beside this openvino) on `model`, batch 1."""
    code = "import sys; from openvino.tools.benchmark.main import main; sys.argv[0] = 'benchmark_app'; main()"
    cmd = [sys.executable, "-c", code, "-m", str(model), "-d", "CPU", "-hint", hint, "-t", str(seconds),
           "-shape", f"[1,3,{size},{size}]"]
    from devices.probe import bf16_units, isa_cap

    if isa_cap() and not bf16_units():  # what edgetune compiles under the cap (devices.openvino_compile)
        cmd += ["-infer_precision", "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True)

    def grab(pattern: str) -> float:
        m = re.search(pattern, proc.stdout)
        if proc.returncode or not m:
            raise RuntimeError(f"benchmark_app failed ({proc.returncode}):\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
        return float(m.group(1))

    return {"p50": grab(r"Median:\s+([\d.]+)\s*ms"), "fps": grab(r"Throughput:\s+([\d.]+)\s*FPS")}


def old_latency(model: Path, size: int, runs: int) -> float:
    """What `edgetune benchmark` measured before: THROUGHPUT-compiled, dynamic batch, one request."""
    from toolkit.benchmark import synthetic_input, time_calls
    from toolkit.runtime import openvino_runner

    run = openvino_runner(model, latency=False)
    x = synthetic_input(size)
    return median(time_calls(lambda: run(x), runs))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, help="reuse a trained run instead of training a default one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=300, help="batch-1 repetitions per round")
    ap.add_argument("--seconds", type=int, default=8, help="benchmark_app / throughput duration per round")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from exporters import export
    from toolkit.benchmark import measure, onnx_latency, onnx_throughput

    start_load = load_average()
    run = default_run(args.run, "bench-runtime-")
    bundles = {}
    for label, (fmt, opts) in BUNDLES.items():
        out = run / "exports" / f"bench-{label.replace(' ', '-')}"
        if not (out / "manifest.json").is_file():
            export(run, fmt, out, **opts)
        bundles[label] = out

    rows, samples = [], {label: {} for label in bundles}
    for _ in range(args.rounds):
        for label, bundle in bundles.items():
            m = measure(bundle, runs=args.runs, seconds=args.seconds)
            s = samples[label]
            s.setdefault("ours_p50", []).append(m.percentile(50))
            s.setdefault("ours_p99", []).append(m.percentile(99))
            s.setdefault("ours_fps", []).append(m.throughput_img_s)
            model = next(bundle.glob("model.xml"), None) or bundle / "model.onnx"
            size = int(re.search(r'"size": (\d+)', (bundle / "manifest.json").read_text()).group(1))
            s["size"] = size
            try:
                lat = benchmark_app(model, size, hint="latency", seconds=args.seconds)
                tput = benchmark_app(model, size, hint="throughput", seconds=args.seconds)
                s.setdefault("app_p50", []).append(lat["p50"])
                s.setdefault("app_fps", []).append(tput["fps"])
            except RuntimeError as e:
                if model.suffix != ".onnx":
                    raise  # the reference of an OpenVINO bundle's target
                # An .onnx in OpenVINO is only a side note. Under ONEDNN_MAX_CPU_ISA OpenVINO may pick
                # kernels from CPUID that the capped oneDNN refuses (int8-weight FullyConnected).
                lines = [ln.strip() for ln in str(e).splitlines()]
                s["app_error"] = next((ln for ln in lines if "could not" in ln), next(
                    (ln for ln in lines if "ERROR" in ln), "failed"))
            if model.suffix == ".onnx":
                s.setdefault("ort_p50", []).append(median(onnx_latency(model, size, runs=args.runs)))
                s.setdefault("ort_fps", []).append(onnx_throughput(model, size, seconds=args.seconds)[0])
            else:
                s.setdefault("old_p50", []).append(old_latency(model, size, args.runs))

    for label, s in samples.items():
        # The target compares like with like: OpenVINO bundles against benchmark_app on the same .xml,
        # ONNX bundles against a bare onnxruntime loop (benchmark_app would run the .onnx in OpenVINO).
        refs, ref_name = (s["ort_p50"], "bare onnxruntime loop") if "ort_p50" in s else \
            (s["app_p50"], "benchmark_app -hint latency")
        # The ratio of each round's pair, measured minutes apart at most: on a shared machine the
        # load drifts between rounds by more than the 10% the target allows (two runs of one ORT
        # loop differed by 1.23x as medians of rounds).
        ratios = [o / r for o, r in zip(s["ours_p50"], refs)]
        ratio = median(ratios)
        rows.append(Row(f"{label}: latency p50 / {ref_name}",
                        f"{median(s['ours_p50']):.2f} ms / {median(refs):.2f} ms; per round {ratio:.2f}x",
                        f"<= {1 + TOLERANCE:.2f}x", ratio <= 1 + TOLERANCE,
                        f"rounds {min(ratios):.2f}-{max(ratios):.2f}x; p99 {median(s['ours_p99']):.2f} ms"))
        if "ort_p50" not in s:
            note = f"benchmark_app -hint throughput {median(s['app_fps']):.1f} FPS"
        else:
            app = (f"p50 {median(s['app_p50']):.2f} ms, {median(s['app_fps']):.1f} FPS" if "app_p50" in s else
                   f"did not compile ({s['app_error'][:120]})")
            note = (f"bare onnxruntime loop {median(s['ort_fps']):.1f} img/s (batch 8); the .onnx in benchmark_app "
                    f"(OpenVINO): {app}")
        rows.append(Row(f"{label}: throughput", f"{median(s['ours_fps']):.1f} img/s", "", None, note))
        if "old_p50" in s:
            rows.append(Row(f"{label}: before this fix (THROUGHPUT-compiled, dynamic batch)",
                            f"{median(s['old_p50']):.2f} ms = {median(s['old_p50']) / median(refs):.2f}x "
                            "benchmark_app",
                            "", None, "what `edgetune benchmark` reported before"))

    title = isa_section("Runtime latency: `edgetune benchmark` vs benchmark_app")
    print_table(title, rows)
    md = "\n".join([
        f"Machine: {machine_description()}; load average {start_load} -> {load_average()}.",
        f"Command: `{command_line()}`. Medians over {args.rounds} interleaved rounds of {args.runs} batch-1 runs "
        f"and {args.seconds} s benchmark_app runs each; every bundle from one default ants/bees run. The "
        "latency target is judged on the median of each round's ratio (edgetune over its reference).",
        "",
        markdown_table(rows),
    ])
    update_benchmarks_md(title, md)


if __name__ == "__main__":
    main()
