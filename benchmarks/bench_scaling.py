"""Scaling curve: `edgetune train` wall time and peak memory on generated folders of growing size.

    python benchmarks/bench_scaling.py                       # 1k, 5k, 9k, 20k, 50k images, then the table
    python benchmarks/bench_scaling.py --sizes 50000 --no-write   # one size (e.g. one per timed command)
    python benchmarks/bench_scaling.py --sizes                # no new runs: the table from the stored ones

Each size is a folder of generated tabletop photos (toolkit.synthetic: 5 classes, small JPEGs,
80/20 train/val), made once under --root and reused: the smaller folders hold hard links to the
first images of the largest. Every run is a fresh `python -m toolkit.cli train` child process with
the default TrainConfig (the views default included) plus any `--train-arg`s; its peak RSS is the
child's own ru_maxrss (os.wait4), so this script's memory never counts. Results accumulate in
ROOT/results.json, keyed by --label, so sizes can be measured in separate commands.

The memory target: peak RSS must not grow with the number of images beyond the features kept,
float16 (N_train x (1 + views) + N_val) x feature_dim.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, Row, command_line, load_average, machine_description, markdown_table,  # noqa: E402
                                print_table, update_benchmarks_md)

SECTION = "Scaling"
SIZES = (1000, 5000, 9000, 20000, 50000)
VAL_FRACTION = 0.2
RSS_LIMIT_MB = 1500.0  # issue 10: on a 9k-image folder and on the 50k one
RSS_GROWTH = 1.3  # the largest run's peak within 1.3x the smallest's plus its features


# ------------------------------------------------------------------------------------- data


def _render_class(args: tuple[Path, int, int, str, int, int, int]) -> None:
    from toolkit.synthetic import JPEG_QUALITY, render_object

    import cv2

    from toolkit import atomic

    folder, split, ci, cls, start, stop, size = args
    for i in range(start, stop):
        path = folder / f"{i:05d}.jpg"
        if path.exists():  # an interrupted generation is completed, not redone
            continue
        # The generator's own seeding (toolkit.synthetic.make_tabletop_dataset): image i of a class
        # is the same whatever else is generated.
        rng = np.random.default_rng(np.random.SeedSequence([0, split, ci, i]))
        rgb = render_object(cls, rng, size)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        atomic.write_bytes(path, buf.tobytes())


def _counts(size: int) -> dict[str, int]:
    """Images per class in each split of a folder of `size` images."""
    from toolkit.synthetic import DEMO_CLASSES

    per_class = size // len(DEMO_CLASSES)
    val = round(per_class * VAL_FRACTION)
    return {"train": per_class - val, "val": val}


def make_pool(root: Path, size: int, image_size: int, workers: int) -> Path:
    """ROOT/pool-<px>: `size` generated images (rendered in parallel, kept for later runs)."""
    from toolkit.synthetic import DEMO_CLASSES

    pool = root / f"pool-{image_size}"
    counts = _counts(size)
    jobs = []
    for split_index, split in enumerate(("train", "val")):
        for ci, cls in enumerate(DEMO_CLASSES):
            folder = pool / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            if len(list(folder.glob("*.jpg"))) < counts[split]:
                jobs += [(folder, split_index, ci, cls, s, min(s + 500, counts[split]), image_size)
                         for s in range(0, counts[split], 500)]
    if jobs:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_render_class, jobs))
        print(f"generated {pool} ({size} images) in {time.perf_counter() - t0:.0f} s", flush=True)
    return pool


def size_folder(root: Path, pool: Path, size: int) -> Path:
    """ROOT/n<size>/{train,val}/<class>: hard links to the pool's first images of each class."""
    from toolkit.synthetic import DEMO_CLASSES

    out = root / f"{pool.name}-n{size}"
    counts = _counts(size)
    for split in ("train", "val"):
        for cls in DEMO_CLASSES:
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(counts[split]):
                dst = folder / f"{i:05d}.jpg"
                if not dst.exists():
                    os.link(pool / split / cls / f"{i:05d}.jpg", dst)
    return out


# --------------------------------------------------------------------------------------- runs


def run_train(data: Path, out: Path, code: Path, train_args: list[str]) -> dict:
    """One `edgetune train` child: wall seconds, its own peak RSS (MB) and its metrics."""
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "toolkit.cli", "train", str(data), "--out", str(out), *train_args]
    load_before = load_average()
    t0 = time.perf_counter()
    log = out.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=sink, stderr=subprocess.STDOUT)
        # The features cache appears when extraction ends: the RSS peak until then is the data
        # pipeline's own, what follows is head selection on the kept features.
        pipeline_peak, features_done = 0.0, False
        # A sample counts only if the cache was still absent after it was taken: the sample that
        # first sees the cache may already hold the start of head selection (SciPy, the prior).
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if not features_done:
                rss = _rss_mb(proc.pid)
                features_done = any((out / "state").glob("features-*.npz"))
                if not features_done:
                    pipeline_peak = max(pipeline_peak, rss)
            time.sleep(0.2)
    output = log.read_text("utf-8", "replace")
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the script's
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}) on {data}:\n{output[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # the feature cache of a 50k run is most of a GB
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "pipeline_rss_mb": round(pipeline_peak, 1),
            "load": f"{load_before} -> {load_average()}", "metrics": metrics, "train": config["train"],
            "feature_dim": config["backbone"]["feature_dim"]}


def _rss_mb(pid: int) -> float:
    """The process's resident memory now (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def features_mb(r: dict) -> float:
    """The features a run keeps: float16, (1 + views) per training image, one per val image."""
    m, views = r["metrics"], r["train"]["views"]
    return (m["n_train"] * (1 + views) + m["n_val"]) * r["feature_dim"] * 2 / 2**20


# -------------------------------------------------------------------------------------- table


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def curve(runs: list[dict]) -> list[str]:
    lines = ["| images (train + val) | train wall | per 1k images | views/s | peak RSS | peak RSS until the features "
             "are cached | features (float16) | peak RSS - features | load avg (before -> after) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        m = r["metrics"]
        lines.append(f"| {r['images']:,} ({m['n_train']:,} + {m['n_val']:,}) | {r['seconds']:.0f} s | "
                     f"{1000 * r['seconds'] / r['images']:.1f} s | {m.get('views_per_second', 'cached')} | "
                     f"{_mb(r['peak_rss_mb'])} | {_mb(r.get('pipeline_rss_mb'))} | {_mb(features_mb(r))} | "
                     f"{_mb(r['peak_rss_mb'] - features_mb(r))} | {r['load']} |")
    return lines


def targets(runs: list[dict]) -> list[Row]:
    """The issue's memory targets, for the whole run and for the data pipeline alone."""
    rows: list[Row] = []
    for key, what in (("peak_rss_mb", "whole run"), ("pipeline_rss_mb", "until the features are cached")):
        measured = [r for r in runs if r.get(key)]
        if len(measured) >= 2:
            small, big = measured[0], measured[-1]
            span = big["images"] - small["images"]
            slope = (big[key] - small[key]) * 1024 / span
            feat_slope = (features_mb(big) - features_mb(small)) * 1024 / span
            limit = RSS_GROWTH * small[key] + features_mb(big)
            rows.append(Row(f"peak RSS slope, {what}", f"{slope:.1f} KB/image",
                            note=f"the features alone: {feat_slope:.1f} KB/image "
                                 f"({small['images']:,} -> {big['images']:,} images)"))
            rows.append(Row(f"peak RSS {what}, {big['images']:,} vs {small['images']:,} images", _mb(big[key]),
                            f"<= {RSS_GROWTH} x {small[key]:.0f} + {features_mb(big):.0f} (features) = {limit:.0f} MB",
                            big[key] <= limit))
        for r in measured:
            if r["images"] in (9000, 50000):
                rows.append(Row(f"peak RSS {what}, {r['images']:,} images", _mb(r[key]), f"<= {RSS_LIMIT_MB:.0f} MB",
                                r[key] <= RSS_LIMIT_MB))
    return rows


def report(everything: dict[str, dict], labels: list[str]) -> tuple[str, list[Row]]:
    """Markdown: one curve per label, the targets checked on each."""
    parts, all_rows = [], []
    for label in labels:
        runs = sorted(everything.get(label, {}).values(), key=lambda r: r["images"])
        if not runs:
            continue
        first, rows = runs[0], targets(runs)
        all_rows += rows
        m = first["metrics"]
        parts += [
            f"### `{label}`: {first['machine']}",
            "",
            f"One fresh `{first['command']}` process per folder of generated {first['image_size']} px tabletop "
            f"JPEGs (toolkit.synthetic, 5 classes, 80/20 train/val): {first['train']['backbone']}, "
            f"{first['train']['views']} augmented views + 1 clean per training image, head "
            f"{m['head']['requested']}, features on {m['feature_engine']}.",
            "",
            *curve(runs),
            "",
            *([markdown_table(rows), ""] if rows else []),
        ]
    md = "\n".join([
        "Peak RSS is the train process's own ru_maxrss (os.wait4); \"until the features are cached\" is its "
        "largest VmRSS sampled (every 0.2 s) before the run's feature cache appears: the data pipeline "
        "(check, decode, augment, extract), without head selection. The features are what a run must "
        "keep: float16, (N_train x (1 + views) + N_val) x feature_dim.",
        "",
        *parts,
    ])
    return md, all_rows


def main(argv: list[str] | None = None) -> None:
    from toolkit.train import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=list(SIZES),
                    help="folder sizes (train + val images) to run; none: only print and write the table")
    ap.add_argument("--root", type=Path, default=Path("/tmp/edgetune-scaling"), help="generated folders and results")
    ap.add_argument("--image-size", type=int, default=128, help="side of the generated JPEGs")
    ap.add_argument("--views", type=int, default=TrainConfig().views, help="augmented views per image [TrainConfig's]")
    ap.add_argument("--train-arg", action="append", default=[], help="extra `edgetune train` argument (repeatable)")
    ap.add_argument("--code", type=Path, default=REPO, help="the edgetune checkout to run (e.g. an older one)")
    ap.add_argument("--label", default="current", help="results of another --code or machine go under another label")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes generating images")
    ap.add_argument("--labels", nargs="*", help="the labels to put in the table [--label]")
    ap.add_argument("--note", default="", help="a paragraph for the top of the section (how the runs were made)")
    ap.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = ap.parse_args(argv)

    args.root.mkdir(parents=True, exist_ok=True)
    store = args.root / "results.json"
    everything = json.loads(store.read_text()) if store.exists() else {}
    results = everything.setdefault(args.label, {})
    if args.sizes:
        pool = make_pool(args.root, max(args.sizes), args.image_size, args.workers)
    for size in args.sizes:
        data = size_folder(args.root, pool, size)
        train_args = ["--views", str(args.views), *args.train_arg]
        print(f"training on {data} ...", flush=True)
        r = run_train(data, args.root / "runs" / f"{args.label}-n{size}", args.code.resolve(), train_args)
        r.update(images=size, image_size=args.image_size, machine=machine_description(),
                 command=f"edgetune train DATA {' '.join(train_args)}")
        results[str(size)] = r
        print(f"{size} images: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"features {features_mb(r):.0f} MB, load {r['load']}", flush=True)
        store.write_text(json.dumps(everything, indent=1))  # after every size: a later failure keeps it
    labels = args.labels or [args.label]
    md, rows = report(everything, labels)
    md = f"{args.note}\n\n{md}" if args.note else md
    print(md)
    if rows:
        print_table("Scaling", rows)
    if not args.no_write and any(everything.get(label) for label in labels):
        command = command_line().replace(shlex.quote(args.note), "'...'") if args.note else command_line()
        update_benchmarks_md(SECTION, md + f"\nCommand: `{command}`\n")


if __name__ == "__main__":
    main()
