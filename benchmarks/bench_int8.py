"""int8 on every dataset: calibration methods, then the default export command, per dataset.

    python benchmarks/bench_int8.py [--run NAME=RUN_DIR ...] [--skip-methods] [--entropy]

Without --run it trains default runs on ../shared/datasets/hymenoptera, ../shared/datasets/caltech50
and a copy of caltech50 downscaled to 128 px (built in a temp dir, never in the repo: what a
low-resolution robot camera gives). Part 1 quantizes each run with every calibration method and
fix on the same calibration subset and measures, on held-out TRAINING images against the fp32
model (the run's head refit without them), the accuracy drop, top-1 agreement and worst class; part 2 runs the default
`export RUN --format onnx-int8|openvino-int8` (budget, fallback and all) and times it. Prints the
tables and replaces the "## int8 calibration methods" and "## int8 exports" sections of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import SHARED_DATASETS as SHARED  # noqa: E402
from benchmarks._common import command_line, cpu_flags, load_average, machine_description, update_benchmarks_md  # noqa: E402


def downscaled(source: Path, dst: Path, side: int = 128) -> Path:
    import cv2

    for p in sorted(source.rglob("*")):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR) if p.is_file() else None
        if img is None:
            continue
        s = side / max(img.shape[:2])
        small = cv2.resize(img, (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s))),
                           interpolation=cv2.INTER_AREA)
        out = dst / p.relative_to(source).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), small, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return dst


def augmented_copies(source: Path, dst: Path, copies: int = 5, seed: int = 0) -> Path:
    """A bigger training set for the export-time target: `copies` distinct photometric/geometric
    variants (crop 75-100%, flip, brightness/contrast, JPEG quality 70-95) of every training image
    of `source`, and its val split as is. caltech50 x 5 = 5,000 training images in 50 classes."""
    import cv2

    rng = np.random.default_rng(seed)
    for p in sorted((source / "train").rglob("*")):
        img = cv2.imread(str(p), cv2.IMREAD_COLOR) if p.is_file() else None
        if img is None:
            continue
        for k in range(copies):
            h, w = img.shape[:2]
            f = rng.uniform(0.75, 1.0)
            y, x = rng.integers(0, h - int(h * f) + 1), rng.integers(0, w - int(w * f) + 1)
            out = img[y : y + int(h * f), x : x + int(w * f)]
            out = out[:, ::-1] if rng.random() < 0.5 else out
            out = np.clip(out.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255).astype(np.uint8)
            path = dst / "train" / p.relative_to(source / "train").with_name(f"{p.stem}-{k}.jpg")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(70, 96))])
    for p in sorted((source / "val").rglob("*")):
        if p.is_file():
            path = dst / "val" / p.relative_to(source / "val")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(p.read_bytes())
    return dst


def default_runs(work: Path) -> dict[str, Path]:
    from toolkit.train import TrainConfig, train

    data = {"ants/bees": SHARED / "hymenoptera", "caltech50": SHARED / "caltech50",
            "caltech50 @128 px": downscaled(SHARED / "caltech50", work / "caltech50-128")}
    runs = {}
    for name, path in data.items():
        runs[name] = work / name.replace("/", "-").replace(" ", "")
        train(path, runs[name], TrainConfig())
    return runs


def summary(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray) -> tuple[str, str, str]:
    from exporters.parity import measure

    p = measure(reference, exported, labels)
    return f"{p.accuracy_drop:+.2f}", f"{p.agreement:.2%}", f"{p.worst_class_drop:.1f}" if p.worst_class else "-"


def ort_latency_ms(model: Path, x: np.ndarray) -> float:
    from toolkit.runtime import onnx_runner

    run = onnx_runner(model)
    for _ in range(5):
        run(x)
    times = []
    for _ in range(30):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def heldout_split(run, held_max: int):
    """Training images only: half of each class is the pool (calibration is drawn from it), the
    other half (at most `held_max`, stratified) is held out. Returns (labels of all training images,
    pool indices, held-out indices, pool views, held-out views), views float32 NCHW 0-255."""
    from exporters.base import _splits, stratified_subset
    from toolkit.preprocess import model_input
    from toolkit.runtime import to_nchw_float

    samples = _splits(run).train.samples
    labels = [s.label for s in samples]
    pool = stratified_subset(labels, len(labels) // 2)
    rest = [i for i in range(len(labels)) if i not in set(pool)]
    held = [rest[i] for i in stratified_subset([labels[i] for i in rest], held_max)]

    def views(idx):
        return to_nchw_float(np.stack([model_input(samples[i].path, run.spec.input_size) for i in idx]))

    return labels, pool, held, views(pool), views(held)


def refit_selected_head(run, feats: np.ndarray, labels: np.ndarray):
    """The head the run selected (metrics.json), with its options, fitted afresh on (feats, labels);
    a head that reads the backbone's ImageNet prior gets it."""
    import json

    from toolkit.features import imagenet_prior
    from toolkit.head_fit import HEADS, fit_head

    selected = json.loads((run.path / "metrics.json").read_text())["head"]
    prior = imagenet_prior(run.spec) if HEADS[selected["selected"]].needs_prior else None
    return fit_head(selected["selected"], feats, labels, len(run.labels), prior=prior, **selected["options"])


def pool_head_run(run, pool_x: np.ndarray, pool_labels: np.ndarray, work: Path):
    """A copy of the run under `work` whose head is the run's selected head refit on the pool's fp32
    features alone, so the held-out half is unseen by the head as well as by calibration (a head
    scored on its own training images agrees with any quantization more easily)."""
    import json
    import shutil

    import openvino as ov

    from toolkit.features import _openvino_backbone, float_input
    from toolkit.head_fit import model_tensors
    from toolkit.runs import RunDir

    compiled = ov.Core().compile_model(float_input(_openvino_backbone(run.spec, "fp32", None)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    feats = np.concatenate([compiled(pool_x[i:i + 16])[0] for i in range(0, len(pool_x), 16)])
    params = refit_selected_head(run, feats, pool_labels)
    dst = work / "pool-head-run"
    shutil.copytree(run.path, dst, ignore=shutil.ignore_patterns("state"))
    copy = RunDir.open(dst)
    copy.write_model(model_tensors(params), {"format": "edgetune-run", "backbone": run.spec.name,
                                             "labels": json.dumps(run.labels)})
    record = copy.config
    record["train"].update(head=params.kind, hidden=params.hidden or record["train"].get("hidden"))
    copy.write_config(record)
    return copy


def size_rows(name: str, run_dir: Path, sizes: tuple[int, ...] = (64, 128, 300), draws: int = 3) -> list[tuple]:
    """How many calibration images are enough, on TRAINING images only (heldout_split,
    pool_head_run, as method_rows): each format is calibrated on stratified subsets of the pool of
    growing size and on the whole pool, and scored by top-1 agreement with the pool head's fp32
    model on the held-out half. Draw 0 of a size is the subset the export takes (stratified_subset,
    spread evenly); draws 1.. are random stratified subsets of the same size, so the spread between
    draws shows how much of a difference between sizes is the choice of images."""
    import openvino as ov

    from exporters import onnx_int8, openvino_ir, parity
    from exporters.base import ExportContext, stratified_subset
    from toolkit.runs import RunDir
    from toolkit.runtime import onnx_runner, openvino_runner, run_batched

    source = RunDir.open(run_dir)
    all_labels, pool, held, pool_x, held_x = heldout_split(source, 500)
    pool_labels = np.array([all_labels[i] for i in pool])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = pool_head_run(source, pool_x, pool_labels, tmp)
        ctx = ExportContext(run)
        target = parity.run_dir_logits(run, held_x).argmax(1)
        prep = onnx_int8.preprocessed(run, tmp, ctx)
        model = openvino_ir.cached_classifier(run, ctx)

        def subset(n: int, draw: int) -> np.ndarray:
            if draw == 0:
                return np.array(stratified_subset(pool_labels.tolist(), n))
            order = np.random.default_rng([draw, n]).permutation(len(pool_labels))
            return np.sort(order[stratified_subset(pool_labels[order].tolist(), n)])

        for n in [k for k in sizes if k < len(pool)] + [len(pool)]:
            agree: dict[str, list[float]] = {"onnx": [], "openvino": []}
            secs: dict[str, list[float]] = {"onnx": [], "openvino": []}
            for draw in range(draws if n < len(pool) else 1):
                calib = pool_x[subset(n, draw)]
                t = time.perf_counter()
                onnx_int8.quantize(prep, tmp / "q.onnx", onnx_int8.calibrate(prep, calib, batch=8))
                secs["onnx"].append(time.perf_counter() - t)
                out = run_batched(onnx_runner(tmp / "q.onnx"), held_x, batch=None)
                agree["onnx"].append(float((out.argmax(1) == target).mean()))
                t = time.perf_counter()
                ov.save_model(openvino_ir.quantize(model.clone(), calib), str(tmp / "q.xml"))
                secs["openvino"].append(time.perf_counter() - t)
                out = run_batched(openvino_runner(tmp / "q.xml", precise=True), held_x, batch=None)
                agree["openvino"].append(float((out.argmax(1) == target).mean()))

            def cell(fmt: str) -> str:
                a = agree[fmt]
                return f"{a[0]:.2%}" + (f" (draws {', '.join(f'{v:.2%}' for v in a[1:])})" if len(a) > 1 else "")

            rows.append((name, f"{n}{' (all)' if n == len(pool) else ''}", str(len(held)),
                         cell("onnx"), f"{np.median(secs['onnx']):.1f} s",
                         cell("openvino"), f"{np.median(secs['openvino']):.1f} s"))
            print(rows[-1], flush=True)
    return rows


def method_rows(name: str, run_dir: Path, entropy: bool) -> list[tuple]:
    """Every calibration method / fix on one run, on the same calibration subset, scored on TRAINING
    images the calibration and the head never saw (heldout_split, pool_head_run): the defaults
    are chosen from this table, so it must not be measured on the val split."""
    import nncf

    from exporters import onnx_int8, openvino_ir, parity
    from exporters.base import MAX_CALIBRATION, ExportContext, stratified_subset
    from toolkit.features import int8_advanced_parameters
    from toolkit.runs import RunDir
    from toolkit.runtime import onnx_runner, openvino_runner, run_batched

    source = RunDir.open(run_dir)
    all_labels, pool, held, pool_x, inputs = heldout_split(source, 500)
    pool_labels = np.array([all_labels[i] for i in pool])
    labels = np.array([all_labels[i] for i in held])
    calib = pool_x[stratified_subset(pool_labels.tolist(), MAX_CALIBRATION)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = pool_head_run(source, pool_x, pool_labels, tmp)
        ctx = ExportContext(run)
        reference = parity.run_dir_logits(run, inputs)
        classifier = run.build_classifier()
        prep = onnx_int8.preprocessed(run, tmp, ctx)
        fp32_ms = ort_latency_ms(prep, inputs[:1])
        methods = ["MinMax", "Percentile"] + (["Entropy"] if entropy else [])
        variants = {
            "MinMax": [("ORT defaults (no fixes)", {"overrides": False}),
                       ("QuantizeBias=False (biases stay float)", {"overrides": False,
                                                                   "extra_options": {"QuantizeBias": False}}),
                       ("+ int32-safe biases", {"seven_bit": "none"}),
                       ("+ int32-safe biases + 7-bit stem (default)", {}),
                       ],
        }
        for method in methods:
            t = time.perf_counter()
            ranges = onnx_int8.calibrate(prep, calib, batch=8, method=method)
            calib_s = time.perf_counter() - t
            for label, kw in variants.get(method, [("+ int32-safe biases + 7-bit stem", {})]):
                t = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    onnx_int8.quantize(prep, tmp / "q.onnx", ranges, **kw)
                seconds = calib_s + time.perf_counter() - t
                casts = sum(issubclass(w.category, RuntimeWarning) for w in caught)
                exported = run_batched(onnx_runner(tmp / "q.onnx"), inputs, batch=None)
                ratio = ort_latency_ms(tmp / "q.onnx", inputs[:1]) / fp32_ms
                rows.append((name, "onnx-int8", f"ORT {method}, {label}", *summary(reference, exported, labels),
                             f"{seconds:.0f} s", f"{ratio:.2f}", str(casts)))
        model = openvino_ir.convert(classifier, ctx)
        data = nncf.Dataset(openvino_ir.batches(calib, 1))

        def fix(mode):
            return nncf.AdvancedQuantizationParameters(overflow_fix=getattr(nncf.OverflowFix, mode))

        def nncf_recipe(**kw):
            return lambda: nncf.quantize(model, data, subset_size=len(calib), ignored_scope=openvino_ir.head_scope(), **kw)

        from toolkit.features import backbone_int8, cached_int8_backbone

        def v4(batch: int = 1, **nncf_options):
            return lambda: backbone_int8(model, openvino_ir.batches(calib, batch), float_ops=openvino_ir.HEAD_OPS,
                                         **nncf_options)

        recipes = [
            ("NNCF fast bias correction, 7-bit weights; depthwise layers, stem and first two blocks reading float inputs "
             "(recipe v4, default)",
             lambda: openvino_ir.quantize(model, calib)),
            ("recipe v4, bias correction off",
             v4(advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE,
                                                                        disable_bias_correction=True))),
            ("recipe v4, calibration batches of 8 images (default: 1)", v4(batch=8)),
            ("NNCF fast bias correction, 7-bit weights every layer, every layer int8 (the default before 2026-12-07)",
             nncf_recipe(fast_bias_correction=True, advanced_parameters=int8_advanced_parameters())),
            ("NNCF full bias correction, 7-bit weights every layer",
             nncf_recipe(fast_bias_correction=False, advanced_parameters=int8_advanced_parameters())),
            ("NNCF fast bias correction, 7-bit first layer (NNCF's default)",
             nncf_recipe(fast_bias_correction=True, advanced_parameters=fix("FIRST_LAYER"))),
            ("NNCF fast bias correction, overflow fix off (8-bit weights)",
             nncf_recipe(fast_bias_correction=True, advanced_parameters=fix("DISABLE"))),
            # No NNCF at export at all: the int8 backbone this machine quantized once on generated
            # scenes (what --backbone-precision int8 trains on) under the run's float-trained head.
            ("the machine's cached int8 backbone (generated scenes), no NNCF per export",
             lambda: openvino_ir.with_head(cached_int8_backbone(run.spec), run, ctx)),
        ]
        for label, build in recipes:
            t = time.perf_counter()
            q = build()
            seconds = time.perf_counter() - t
            openvino_ir.save(q, tmp / "q.xml", fp16=True)
            exported = run_batched(openvino_runner(tmp / "q.xml", precise=True), inputs, batch=None)
            rows.append((name, "openvino-int8", label, *summary(reference, exported, labels),
                         f"{seconds:.0f} s", "", ""))
    print(f"{name}: {len(calib)} calibration images (max {MAX_CALIBRATION}), {len(labels)} held-out training images",
          flush=True)
    return rows


STAGES = ("val images", "reference", "convert", "calibration images", "calibrate", "quantize",
          "calibrate + quantize", "parity", "NNCF quantization", "accuracy-controlled quantization",
          "accuracy control", "feature memory")


_TIMED = """import json, os, subprocess, sys, time
load = "/".join(f"{x:.1f}" for x in os.getloadavg())
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"seconds": time.perf_counter() - t, "load": load}), file=sys.stderr)
sys.exit(rc)"""


def export_rows(name: str, run_dir: Path, lock: str | None) -> list[dict]:
    """The default command, `edgetune export RUN --format F`, each in a fresh process (imports and
    all, as a user runs it) at normal priority, under `flock LOCK` when given; figures from its
    manifest (or its one-line error: exit 2)."""
    import json
    import os
    import subprocess

    from exporters.base import _splits
    from toolkit.runs import RunDir

    n_train = len(_splits(RunDir.open(run_dir)).train)  # what the export sees (the run's data folder now)
    fp32_bytes = fp32_onnx_bytes(run_dir)
    rows = []
    for fmt in ("onnx-int8", "openvino-int8"):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / fmt
            # The clock starts inside the lock (not while waiting for it) and stops at the CLI's exit.
            cmd = [sys.executable, "-c", _TIMED, sys.executable, "-m", "toolkit.cli", "export", str(run_dir),
                   "--format", fmt, "--out", str(out)]
            cmd = ["flock", lock, *cmd] if lock else cmd
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                                  preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0) if os.getuid() == 0 else None)
            timed = json.loads(done.stderr.strip().splitlines()[-1])
            seconds, load = timed["seconds"], timed["load"]
            row = {"run": name, "train images": n_train, "format": fmt, "seconds": seconds, "load": load,
                   "rc": done.returncode, "fp32_bytes": fp32_bytes}
            if done.returncode == 0:
                manifest = json.loads((out / "manifest.json").read_text())
                model = out / manifest["model"]
                row.update(parity=manifest["export_parity"], stages=manifest.get("export_seconds", {}),
                           quantizer=manifest.get("quantizer", "plain"),
                           model_bytes=model.stat().st_size + (model.with_suffix(".bin").stat().st_size
                                                               if model.suffix == ".xml" else 0),
                           warnings=done.stderr.count("RuntimeWarning"))
            else:
                row["error"] = " ".join(done.stderr.strip().splitlines()[-4:-1])[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def export_table(rows: list[dict]) -> list[str]:
    import dataclasses

    from exporters.parity import Budget, Parity

    out = []
    for r in rows:
        if r["rc"] != 0:
            out.append((r["run"], str(r["train images"]), r["format"], f"FAILED (exit {r['rc']})", "", "", "",
                        f"{r['seconds']:.0f} s ({r['load']})", "", r.get("error", "")))
            continue
        p = r["parity"]
        # The export's own rule (one val image is the finest a drop can be resolved), not a re-derivation.
        measured = Parity(**{f.name: p[f.name] for f in dataclasses.fields(Parity)})
        ok = not Budget(**p.get("budget", {})).misses(measured)
        limit = 15 if r["train images"] != "?" and int(r["train images"]) < 500 else 30
        stages = ", ".join(f"{k} {r['stages'][k]:.1f}" for k in STAGES if k in r["stages"])
        ratio = r["model_bytes"] / r["fp32_bytes"] if r.get("fp32_bytes") else None
        size = f"{ratio:.2f}x ({'pass' if ratio <= 0.3 else 'FAIL'})" if ratio else "n/a"
        out.append((r["run"], str(r["train images"]), r["format"],
                    f"{p['source_accuracy']:.2%} -> {p['export_accuracy']:.2%}", f"{p['accuracy_drop_points']:+.2f}",
                    f"{p['agreement']:.2%}", f"{p['worst_class_drop']:.1f}",
                    f"{r['seconds']:.1f} s ({'pass' if r['seconds'] <= limit else 'FAIL'} <= {limit} s; load {r['load']})",
                    size, f"{'pass' if ok else 'FAIL'}; {r['quantizer']}; RuntimeWarnings {r['warnings']}; {stages}"))
    return table(("run", "train images", "format", "val accuracy", "drop", "agreement", "worst class drop",
                  "export wall time", "size x fp32 ONNX", "budget / quantizer / stages (s)"), out)


def table(head: tuple, rows: list[tuple]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
           ["| " + " | ".join(str(c) if not isinstance(c, float) else f"{c:.2f}" for c in r) + " |" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR", help="reuse trained runs")
    ap.add_argument("--sizes", action="store_true", help="measure the calibration subset size (training images)")
    ap.add_argument("--skip-methods", action="store_true", help="no calibration-method table")
    ap.add_argument("--skip-exports", action="store_true", help="no default-export table")
    ap.add_argument("--entropy", action="store_true", help="add ORT entropy calibration (slow)")
    ap.add_argument("--render-only", action="store_true", help="rewrite the exports section from --results")
    ap.add_argument("--lock", default=None, help="flock this file around each timed export (shared machines)")
    ap.add_argument("--results", default=str(Path(tempfile.gettempdir()) / "bench-int8-exports.json"),
                    help="export rows kept across invocations (one run per invocation keeps locks short)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    start_load = load_average()
    if args.render_only:  # the exports table from the kept rows, e.g. after runs measured one at a time
        runs = {}
    elif args.run:
        runs = {k: Path(v) for k, v in (item.split("=", 1) for item in args.run)}
    else:
        runs = default_runs(Path(tempfile.mkdtemp(prefix="bench-int8-")))
    header = (f"`{command_line()}`; {machine_description()}; CPU flags: {cpu_flags()}; load average {start_load} "
              "at start, {end} at end (the machine was shared: seconds are noisy, ratios less so).")
    if args.sizes and not args.render_only:
        sizes = [row for name, path in runs.items() for row in size_rows(name, path)]
        text = "\n".join([
            header.format(end=load_average()),
            "",
            "Calibration subset size, chosen on training images only: half of each class's training images is the "
            "pool, the other half (<= 500) is held out, the run's selected head is refit on the pool's fp32 features; "
            "each format is calibrated on stratified subsets of the pool and scored by top-1 agreement with that fp32 "
            "model on the held-out images. The first figure is the subset an export takes (spread evenly over each "
            "class), the draws random stratified subsets of the same size. Time: wall seconds of calibration + "
            "quantization (median over draws).",
            "",
            *table(("run", "calibration images", "held-out images", "onnx-int8 agreement", "onnx-int8 time",
                    "openvino-int8 agreement", "openvino-int8 time"), sizes),
        ])
        print("## int8 calibration subset size\n\n" + text)
        update_benchmarks_md("int8 calibration subset size", text)
    if not args.skip_methods and not args.render_only:
        from exporters.base import MAX_CALIBRATION

        methods = [row for name, path in runs.items() for row in method_rows(name, path, args.entropy)]
        text = "\n".join([
            header.format(end=load_average()),
            "",
            "Calibration methods and fixes, measured on TRAINING images only (the defaults are chosen here, so val "
            "is not used): half of each class's training images is the pool, the other half (<= 500) is held out; "
            "the run's selected head is refit on the pool's fp32 features; every method calibrates on the same "
            f"stratified <= {MAX_CALIBRATION} pool images and is scored against that fp32 model on the held-out images (drop in "
            "points, positive = worse; agreement = top-1 agreement; worst class only over classes with >= 20 "
            "held-out images). Latency: batch-1 ORT CPU, int8 / fp32 graph.",
            "",
            *table(("run", "format", "method", "drop", "agreement", "worst class drop", "quantize time",
                    "latency x fp32", "cast warnings"), methods),
        ])
        print("## int8 calibration methods\n\n" + text)
        update_benchmarks_md("int8 calibration methods", text)
    if not args.skip_exports:
        import json

        results = Path(args.results)
        kept = json.loads(results.read_text()) if results.exists() else []
        for name, path in runs.items():  # one run per locked command keeps each lock short
            rows = export_rows(name, path, args.lock)
            kept = [r for r in (json.loads(results.read_text()) if results.exists() else []) if r["run"] != name]
            kept += rows
            results.write_text(json.dumps(kept, indent=1))
        text = "\n".join([
            header.format(end=load_average()),
            "",
            "The default command, `edgetune export RUN --format F` (no options), each in a fresh process at normal "
            f"priority{' under `flock ' + args.lock + '`' if args.lock else ''}, timed from start to exit (imports "
            "included). Budget: <= 0.5 points (never finer than one val image), >= 98% agreement, <= 5 points per class with >= 20 val images; when "
            "plain quantization misses it, accuracy-controlled quantization runs by itself; exit 2 if that misses too. "
            "Targets: wall time <= 15 s (ants/bees) / <= 30 s (up to 5,000 training images); size <= 0.3x the fp32 "
            "ONNX. Stage seconds are from the bundle's manifest.json (export_seconds). Rows of earlier invocations "
            f"(kept in {results.name}) carry their own load average.",
            "",
            *export_table(kept),
        ])
        print("## int8 exports\n\n" + text, flush=True)
        update_benchmarks_md("int8 exports", text)


def fp32_onnx_bytes(run_dir: Path) -> int:
    """Size of the run's fp32 ONNX classifier (the size target's baseline)."""
    from exporters.base import ExportContext
    from exporters.onnx_fp32 import write_onnx
    from toolkit.runs import RunDir

    run = RunDir.open(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        return write_onnx(run.build_classifier(), Path(tmp) / "m.onnx", ExportContext(run)).stat().st_size


if __name__ == "__main__":
    main()
