"""Robot-side targets (issue 8): learn, classify overhead, calibration, unknown, watch.

    python benchmarks/bench_robot.py [--work DIR] [--skip-caltech]

Trains the host runs it needs (ants/bees; caltech50 with all 50 classes; caltech50 on 25 classes
with the other 25 as unknown), exports ONNX bundles, then measures:
- learn: ants/bees bundle + a new caltech50 class (its 20 train images; its 10 val images held out),
  wall time of the whole `edgetune learn` command, new-class held-out accuracy, ants/bees val drop,
  and the gap to retraining from scratch on the host with all the images;
- classify overhead over the bare runtime call at batch 1 (640x480 BGR frame; median of 200);
- ECE after temperature scaling on ants/bees and caltech50 val (`edgetune evaluate`);
- known-vs-unknown AUROC on caltech50 (25 known classes, the other 25 unknown);
- watch on a 30 fps video file: real-time playback (frames older than one model latency never
  processed; stale ones dropped and counted) and RSS over 10,000 frames.
Writes the "Robot side (issue 8)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (cpu_flags, REPO, Row, command_line, load_average, machine_description, median,  # noqa: E402
                                print_table, run_child, update_benchmarks_md)

SHARED = REPO.parent / "shared" / "datasets"
NEW_CLASS = "scorpion"  # an arthropod: the hard case beside ants and bees


def link_tree(pairs, dst: Path) -> Path:
    """dst/<split>/<class>/<file> symlinks (never copies of the shared datasets)."""
    for src_dir, split, cls in pairs:
        d = dst / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted(Path(src_dir).iterdir()):
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f)
    return dst


def train_and_export(data: Path, run: Path) -> Path:
    import warnings

    from exporters import export
    from toolkit.train import TrainConfig, train

    if not (run / "model.safetensors").exists():
        shutil.rmtree(run, ignore_errors=True)
        train(data, run, TrainConfig(workers=2))
    bundle = run / "exports" / "onnx"
    if not (bundle / "manifest.json").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export(run, "onnx", bundle)
    return bundle


def evaluate(model: Path, data: Path, *extra: str) -> dict:
    out = run_child([sys.executable, "-m", "toolkit.cli", "evaluate", str(model), str(data), "--json", *extra],
                    cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if out.returncode:
        raise SystemExit(out.output[-3000:])
    return json.loads(out.output[out.output.index("{"):])


def bench_learn(work: Path, rows: list[Row]) -> Path:
    hym = SHARED / "hymenoptera"
    bundle = train_and_export(hym, work / "antsbees")
    new = link_tree([(SHARED / "caltech50" / s / NEW_CLASS, s, NEW_CLASS) for s in ("train", "val")], work / "new")
    out = work / "antsbees-learned"
    shutil.rmtree(out, ignore_errors=True)
    walls = []
    for attempt in range(3):
        shutil.rmtree(out, ignore_errors=True)
        r = run_child([sys.executable, "-m", "toolkit.cli", "learn", str(bundle), str(new), "--out", str(out), "--json"],
                      cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        if r.returncode:
            raise SystemExit(r.output[-3000:])
        walls.append(r.seconds)
    result = json.loads(r.output[r.output.index("{"):])
    wall = median(walls)
    new_acc = {row["class"]: row for row in result["per_class"]}[NEW_CLASS]["after"]
    rows.append(Row("learn wall time (ants/bees bundle + 20 new-class images, 10 held out)", f"{wall:.2f} s",
                    "<= 10 s", wall <= 10.0, f"median of 3 runs of the whole command; head {result['head']}"))
    rows.append(Row(f"learn: new class ({NEW_CLASS}) held-out accuracy", f"{new_acc:.3f}", ">= 0.90", new_acc >= 0.90))
    before = evaluate(bundle, hym)  # the run's recorded val split
    after = evaluate(out, hym)
    for cls in ("ants", "bees"):
        drop = (before["per_class"][cls]["recall"] - after["per_class"][cls]["recall"]) * 100
        rows.append(Row(f"learn: {cls} val recall drop", f"{drop:+.2f} pt "
                        f"({before['per_class'][cls]['recall']:.3f} -> {after['per_class'][cls]['recall']:.3f})",
                        "<= 2 pt", drop <= 2.0))
    # Host retraining from scratch with every image (ants/bees train + the new class's train images).
    combined = link_tree([(hym / s / c, s, c) for s in ("train", "val") for c in ("ants", "bees")] +
                         [(SHARED / "caltech50" / s / NEW_CLASS, s, NEW_CLASS) for s in ("train", "val")],
                         work / "combined")
    host = work / "host3"
    train_and_export(combined, host)
    host_acc = evaluate(host, combined)["accuracy"]
    learned_acc = evaluate(out, combined, "--device", "auto")["accuracy"]
    gap = (host_acc - learned_acc) * 100
    rows.append(Row("learn vs host retraining, 3-class val accuracy", f"{learned_acc:.4f} vs {host_acc:.4f} "
                    f"({gap:+.2f} pt)", "within 0.5 pt", abs(gap) <= 0.5 or learned_acc > host_acc))
    return bundle


def bench_classify(bundle: Path, rows: list[Row]) -> None:
    import toolkit
    from toolkit.runtime import onnx_runner, to_nchw_float

    clf = toolkit.load(bundle)
    frame = np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8)
    bare = onnx_runner(bundle / "model.onnx")
    x = to_nchw_float(clf.predictor.preprocess(frame)[None])
    for _ in range(20):
        clf.classify(frame), bare(x)
    t_bare, t_clf = [], []
    for _ in range(200):  # interleaved: load on the machine hits both alike
        t0 = time.perf_counter()
        bare(x)
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        clf.classify(frame)
        t_clf.append(time.perf_counter() - t0)
    over = (median(t_clf) / median(t_bare) - 1) * 100
    rows.append(Row("classify overhead over the bare ONNX Runtime call, batch 1", f"{over:+.1f}% "
                    f"({median(t_clf) * 1e3:.2f} vs {median(t_bare) * 1e3:.2f} ms)", "<= 10%", over <= 10.0,
                    "640x480 BGR frame: preprocessing (resize + crop) included; medians of 200 interleaved"))


def bench_calibration(antsbees: Path, rows: list[Row]) -> None:
    c = evaluate(antsbees, SHARED / "hymenoptera")["calibration"]
    rows.append(Row("ECE ants/bees val (before -> after temperature)", f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}",
                    "<= 0.05", c["ece_after"] <= 0.05, f"T={c['temperature']:.3f}, {c['source']}"))


def bench_caltech(work: Path, rows: list[Row]) -> None:
    cal = SHARED / "caltech50"
    bundle = train_and_export(cal, work / "caltech50")
    c = evaluate(bundle, cal)["calibration"]
    rows.append(Row("ECE caltech50 val (before -> after temperature)", f"{c['ece_before']:.4f} -> {c['ece_after']:.4f}",
                    "<= 0.05", c["ece_after"] <= 0.05, f"T={c['temperature']:.3f}"))
    classes = sorted(p.name for p in (cal / "train").iterdir())
    known, unknown = classes[::2], classes[1::2]
    data = link_tree([(cal / s / k, s, k) for s in ("train", "val") for k in known], work / "caltech25")
    unk = link_tree([(cal / "val" / u, "val", u) for u in unknown], work / "caltech25-unknown") / "val"
    bundle25 = train_and_export(data, work / "caltech25run")
    c = evaluate(bundle25, data, "--unknown", str(unk))["calibration"]
    o = c["open_set"]
    rows.append(Row("unknown AUROC, caltech50 25 known / 25 unknown (val images)", f"{o['auroc']:.4f}", ">= 0.90",
                    o["auroc"] >= 0.90, f"false accepts {o['false_accept_rate']:.1%} at threshold "
                    f"{o['threshold']:.3f} (keeps {o['known_accept_rate']:.1%} of known val)"))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bench_watch(work: Path, bundle: Path, rows: list[Row]) -> None:
    import cv2

    import toolkit
    from toolkit.sources import open_source
    from toolkit.watch import watch

    video = work / "30fps.avi"
    if not video.exists():
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (320, 240))
        rng = np.random.default_rng(0)
        base = rng.integers(0, 255, (240, 320, 3), np.uint8)
        for i in range(10_000):
            writer.write(np.roll(base, i, axis=1))
        writer.release()
    clf = toolkit.load(bundle)

    class Ages:  # how old each frame is when the model takes it (real-time playback)
        def __init__(self):
            self.t0, self.ages = None, []

        def write(self, frame, result):
            now = time.perf_counter()
            if self.t0 is None:
                self.t0 = now - frame.timestamp_ns / 1e9 - result.latency_ms / 1e3
            self.ages.append(now - result.latency_ms / 1e3 - self.t0 - frame.timestamp_ns / 1e9)

        def close(self):
            pass

    ages = Ages()
    src = open_source(str(video))
    s = watch(clf, src, [ages], max_frames=300)
    lat = s.to_json()["latency_ms_median"]
    worst = max(ages.ages[1:]) * 1e3
    rows.append(Row("watch, 30 fps file in real time: processed / dropped", f"{s.processed} / {s.dropped}",
                    "stale frames dropped and counted", s.dropped > 0 or lat < 33,
                    f"{s.to_json()['fps']:.1f} fps processed, model {lat:.1f} ms median"))
    rows.append(Row("watch: oldest frame age when taken", f"{worst:.1f} ms", f"<= one model latency + one frame "
                    f"({lat + 33.3:.0f} ms)", worst <= lat + 33.3 + 5, "age = playback clock - frame time at pickup"))
    src = open_source(str(video), realtime=False)
    samples = []

    class Rss:
        n = 0

        def write(self, frame, result):
            Rss.n += 1
            if Rss.n % 1000 == 0:
                samples.append(_rss_mb())

        def close(self):
            pass

    watch(clf, src, [Rss()], max_frames=10_000)
    growth = samples[-1] - samples[1]
    rows.append(Row("watch: RSS over 10,000 frames (1k -> 2k -> ... -> 10k)", f"{samples[1]:.0f} -> {samples[-1]:.0f} MB "
                    f"({growth:+.1f} MB)", "flat (< 10 MB growth)", abs(growth) < 10.0,
                    f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgetune-bench-robot")
    ap.add_argument("--skip-caltech", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="Print only; leave BENCHMARKS.md alone.")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    title = "Robot side (issue 8)"

    def publish() -> None:  # after every stage: a stopped run still records what it measured
        if args.no_write:
            return
        from benchmarks._common import markdown_table

        md = (f"`{command_line()}`\n\n{machine_description()}; CPU flags: {cpu_flags()}; load average "
              f"{load_average()} (other work on the machine inflates wall times).\n\n{markdown_table(rows)}\n")
        update_benchmarks_md(title, md)

    antsbees = bench_learn(args.work, rows)
    publish()
    bench_classify(antsbees, rows)
    publish()
    bench_calibration(antsbees, rows)
    publish()
    bench_watch(args.work, antsbees, rows)
    publish()
    if not args.skip_caltech:
        bench_caltech(args.work, rows)
        publish()
    print_table(title, rows)

if __name__ == "__main__":
    main()
