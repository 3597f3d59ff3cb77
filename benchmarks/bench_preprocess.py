"""What one full-resolution preprocessing costs, and what the reduced JPEG decode it replaced changed.

edgetune used to decode large JPEGs for training, evaluate and export with OpenCV's reduced-size
decode (IMREAD_REDUCED_COLOR_2/4/8) while predict and any C++ node decode at full size. Now every
path decodes at full size. This script measures, on both shared datasets and on a 3x-upscaled copy
of ants/bees val (phone-photo sizes):

- decode + shrink time per image, old (reduced) vs new (full), single thread, median of 3 passes;
- how many images got different model inputs from the old rule, and the largest pixel difference;
- with a default-trained ants/bees run: evaluate vs predict on the 3x-upscaled val, per image.

    python benchmarks/bench_preprocess.py            # writes the "Preprocessing" section of BENCHMARKS.md
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (  # noqa: E402
    SHARED_DATASETS as SHARED, Row, command_line, cpu_flags, load_average, machine_description, median, print_table,
    update_benchmarks_md)
from toolkit.data import list_images  # noqa: E402
from toolkit.images import ImageReadError, read_image, to_rgb  # noqa: E402
from toolkit.preprocess import eval_resize_shorter, model_input, shrink  # noqa: E402

SIZE = 240  # efficientnet_lite1, the default backbone
SECTION = "Preprocessing"


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def old_decode(path: Path, min_side: int) -> np.ndarray:
    """The removed rule: big JPEGs decoded at 1/2, 1/4 or 1/8 while the shorter side stays >= min_side."""
    data = path.read_bytes()
    size = _jpeg_size(data) if data[:3] == b"\xff\xd8\xff" else None
    if size is None:
        return read_image(path)
    flag = cv2.IMREAD_COLOR
    for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                            (2, cv2.IMREAD_REDUCED_COLOR_2)):
        if min(size) // factor >= min_side:
            flag = reduced
            break
    return to_rgb(cv2.imdecode(np.frombuffer(data, np.uint8), flag))


def decode_timing(files: list[Path]) -> dict[str, float | int]:
    min_side = eval_resize_shorter(SIZE)
    times = {"old": [], "new": []}
    for _ in range(3):
        for name, decode in (("old", lambda p: old_decode(p, min_side)), ("new", read_image)):
            t = time.perf_counter()
            for f in files:
                try:
                    shrink(decode(f), min_side)
                except ImageReadError:
                    pass
            times[name].append((time.perf_counter() - t) / len(files) * 1e3)
    differ, worst = 0, 0
    for f in files:
        try:
            a = model_input(shrink(old_decode(f, min_side), min_side), SIZE, rgb=True)
        except ImageReadError:
            continue
        b = model_input(f, SIZE)
        if not np.array_equal(a, b):
            differ += 1
            worst = max(worst, int(np.abs(a.astype(int) - b).max()))
    return {"old_ms": median(times["old"]), "new_ms": median(times["new"]), "differ": differ, "worst": worst,
            "n": len(files)}


def upscale(src: Path, dst: Path) -> Path:
    for f in list_images(src):
        img = cv2.imread(str(f))
        if img is None:
            continue
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        big = cv2.resize(img, (img.shape[1] * 3, img.shape[0] * 3), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(out.with_suffix(".jpg")), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return dst


def predict_vs_evaluate(data: Path, up_val: Path, tmp: Path) -> dict:
    from toolkit.evaluate import evaluate
    from toolkit.predict import predict_paths
    from toolkit.runtime import load_predictor
    from toolkit.train import TrainConfig, train

    run = tmp / "run"
    train(data, run, TrainConfig())
    predictor = load_predictor(run)
    logits: list[np.ndarray] = []
    inner = predictor._run
    predictor._run = lambda v: logits.append(inner(v)) or logits[-1]
    metrics = evaluate(predictor, up_val)
    files = sorted(list_images(up_val), key=lambda p: (p.parent.name, str(p)))  # evaluate's order
    predicted = {r["path"]: r.get("label") for r in predict_paths(run, files)}
    by_eval = [predictor.labels[i] for i in np.concatenate(logits).argmax(1)]
    by_predict = [predicted[str(f)] for f in files]
    truth = [f.parent.name for f in files]
    return {"n": len(files), "agree": sum(a == b for a, b in zip(by_eval, by_predict)),
            "eval_acc": metrics["accuracy"], "predict_acc": float(np.mean([p == t for p, t in zip(by_predict, truth)]))}


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, not a run
    load_start = load_average()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgetune-pre-") as tmp:
        tmp = Path(tmp)
        up_val = upscale(SHARED / "hymenoptera" / "val", tmp / "up3x")
        sets = {"ants/bees (train+val)": list_images(SHARED / "hymenoptera"),
                "caltech50 (train+val)": list_images(SHARED / "caltech50"),
                "ants/bees val upscaled 3x": list_images(up_val)}
        for name, files in sets.items():
            r = decode_timing(files)
            ratio = r["new_ms"] / r["old_ms"]
            rows.append(Row(f"{name}: decode + shrink, full vs reduced", f"{r['new_ms']:.2f} vs {r['old_ms']:.2f} ms/img "
                            f"({ratio:.2f}x)", note=f"{r['n']} files, 1 thread, median of 3 passes"))
            rows.append(Row(f"{name}: model inputs the reduced decode changed", f"{r['differ']} of {r['n']}",
                            note=f"max pixel difference {r['worst']}"))
        pv = predict_vs_evaluate(SHARED / "hymenoptera", up_val, tmp)
        rows.append(Row("3x-upscaled ants/bees val: predict vs evaluate top-1", f"{pv['agree']} of {pv['n']} identical",
                        target="all identical", ok=pv["agree"] == pv["n"],
                        note=f"accuracy evaluate {pv['eval_acc']:.4f}, predict {pv['predict_acc']:.4f}"))
    title = f"{SECTION} ({machine_description()})"
    print_table(title, rows)
    from benchmarks._common import markdown_table

    md = (f"`{command_line()}`; {machine_description()}; CPU flags: {cpu_flags()}; "
          f"load average {load_start} at start, {load_average()} at end.\n\n"
          "Every path (train, evaluate, predict, export, Predictor, robot API) now decodes at full resolution "
          "(`toolkit/preprocess.py`). 'reduced' is the removed rule (IMREAD_REDUCED_COLOR_2/4/8 for big JPEGs) "
          f"timed in the same process; sizes for the default backbone ({SIZE} px view, shorter side "
          f"{eval_resize_shorter(SIZE)}).\n\n" + markdown_table(rows))
    update_benchmarks_md(SECTION, md)


if __name__ == "__main__":
    main()
