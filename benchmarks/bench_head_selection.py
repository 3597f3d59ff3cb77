"""Head-selection cost: what `--head auto`'s cross-validation adds to the default train.

    python benchmarks/bench_head_selection.py [--datasets hymenoptera caltech50] [--rounds 3]
                                              [--baseline REV] [--no-write]

Each round runs the default `edgetune train DATA --out RUN` as a fresh CLI process, as a user
would, with this checkout and (with --baseline) with git revision REV checked out in a temporary
worktree, interleaved so that both see the same machine load; one untimed run of each first warms
the user cache (the converted backbone) and the page cache. Per run:

    H     = metrics.json head.cv_seconds + head.fit_seconds: the cross-validation and the winner's
            refit (a run without selection would refit too, so H is an upper bound)
    rest  = the process's wall time - H
    added = H / rest

Medians over the rounds. Target (issue 7): added <= 20% on ants/bees. Rewrites the
"## Head-selection cost" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (REPO, Row, command_line, load_average, machine_description, median,  # noqa: E402
                                markdown_table, print_table, run_child, update_benchmarks_md)
from benchmarks.small_data import DATASETS  # noqa: E402 - the two visible sets, as the small-data benchmark names them

SECTION = "Head-selection cost"
TARGET = 0.20  # head selection may add this share of the rest of the default train (ants/bees)


def train_once(code: Path, data: Path, out: Path) -> dict:
    """One default `edgetune train` of `code`'s toolkit in a fresh process: its figures."""
    # `python -c` puts the working directory first on sys.path, so cwd picks the code under test.
    child = run_child([sys.executable, "-c", "from toolkit.cli import main; main()", "train", str(data),
                       "--out", str(out)], cwd=code)
    if child.returncode != 0:
        raise SystemExit(f"edgetune train {data} failed with {code}:\n{child.output[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    head = metrics["head"]
    h = head["cv_seconds"] + head["fit_seconds"]
    return {"wall": child.seconds, "H": h, "rest": child.seconds - h, "added": h / (child.seconds - h),
            "val": metrics["val_accuracy"], "cv": metrics["cv_accuracy"]["mean"],
            "chosen": head["selected"] + (f" {head['options']}" if head["options"] else "")}


def measure(codes: dict[str, Path], data: Path, rounds: int, work: Path) -> dict[str, list[dict]]:
    for name, code in codes.items():  # warm-up, not counted
        train_once(code, data, work / f"warm-{name}")
    runs: dict[str, list[dict]] = {name: [] for name in codes}
    for r in range(rounds):
        for name, code in codes.items():
            fig = train_once(code, data, work / f"{name}-{r}")
            runs[name].append(fig)
            print(f"  {data.name} {name} round {r + 1}: wall {fig['wall']:.2f} s, head selection {fig['H']:.2f} s, "
                  f"added {100 * fig['added']:.1f}%, {fig['chosen']}, CV {fig['cv']:.4f}, val {fig['val']:.4f}",
                  flush=True)
    return runs


def rows_for(dataset: str, runs: dict[str, list[dict]]) -> list[Row]:
    rows = []
    for name, figs in runs.items():
        def each(key: str, fmt: str) -> str:
            return ", ".join(fmt.format(f[key]) for f in figs)

        added = median([f["added"] for f in figs])
        judged = dataset == "hymenoptera" and name == "this code"
        last = figs[-1]
        rows.append(Row(f"{dataset}, {name}: head selection added to the rest of the train",
                        f"+{100 * added:.1f}% (median)", f"<= {100 * TARGET:.0f}%" if judged else "",
                        added <= TARGET if judged else None,
                        f"H {each('H', '{:.2f}')} s; rest {each('rest', '{:.2f}')} s; fresh-CLI wall "
                        f"{each('wall', '{:.2f}')} s; chosen {last['chosen']}, CV {last['cv']:.4f}, val {last['val']:.4f}"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", metavar="REV", help="git revision to measure side by side (a temporary worktree)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    start_load = load_average()
    with tempfile.TemporaryDirectory(prefix="edgetune-head-selection-") as tmp:
        work = Path(tmp)
        codes = {"this code": REPO}
        if args.baseline:
            tree = work / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), args.baseline],
                           check=True)
            codes = {f"baseline {args.baseline}": tree, **codes}
        try:
            rows = [row for d in args.datasets
                    for row in rows_for(d, measure(codes, DATASETS[d], args.rounds, work / d))]
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    title = f"Head-selection cost ({args.rounds} rounds, interleaved)"
    print_table(title, rows)
    if args.no_write:
        return
    judged = [r for r in rows if r.ok is not None]
    text = "\n".join([
        f"Command: `{command_line()}`  ",
        f"Machine: {machine_description()}  ",
        f"Load average (1/5/15 min) at start: {start_load}, at end: {load_average()}",
        "",
        "Each round: the default `edgetune train DATA --out RUN` as a fresh CLI process (imports included, warm user "
        "cache), the codes interleaved. H = metrics.json `head.cv_seconds + head.fit_seconds` (cross-validation and "
        "the winner's refit: an upper bound on what selection adds), rest = wall - H. Per-round figures in the notes.",
        "",
        f"**{sum(r.ok for r in judged)} of {len(judged)} targets met.**",
        "",
        markdown_table(rows),
    ])
    print(f"Wrote the '## {SECTION}' section of {update_benchmarks_md(SECTION, text)}")


if __name__ == "__main__":
    main()
