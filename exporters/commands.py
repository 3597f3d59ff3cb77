"""`edgetune export` and `edgetune benchmark` (added to the main group by toolkit.cli)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from devices.commands import device_option


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class FormatOption(click.Option):
    """--format, whose help lists the registry (read when help is shown, so imports stay lazy)."""

    def get_help_record(self, ctx):
        from exporters import EXPORTERS, list_formats

        self.help = "; ".join(f"{f}: {EXPORTERS[f].description}" for f in list_formats())
        return super().get_help_record(ctx)


@click.command("export")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, metavar="FORMAT", cls=FormatOption)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder [RUN/exports/FORMAT].")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Folder of images to calibrate int8 on [the run's training images].")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="int8: accuracy points the export may lose on the run's val images [0.5; also >= 98% "
                   "top-1 agreement, <= 5 points per class]. Over it, accuracy-controlled quantization is "
                   "tried, then the export fails (exit 2) writing nothing.")
@click.option("--allow-drop", is_flag=True,
              help="int8: write the export even when it misses the accuracy budget (a loud warning, "
                   "recorded in manifest.json).")
@click.option("--static", is_flag=True, help="Fixed batch 1 input shape (NPUs and other static-shape targets).")
@click.option("--fp32", is_flag=True, help="openvino: keep fp32 weights instead of fp16.")
def export_command(run_dir: Path, fmt: str, out: Path | None, calib: Path | None, max_drop: float | None,
                   allow_drop: bool, static: bool, fp32: bool) -> None:
    """Export RUN_DIR as a self-describing bundle, checked against the trained model on its val images."""
    from rich.console import Console

    from exporters import export, get_exporter

    get_exporter(fmt)  # an unknown format fails before any work, with a suggestion
    result = export(run_dir, fmt, out, calibration=calib, max_drop=max_drop, allow_drop=allow_drop, static=static,
                    fp32=fp32)
    console = Console(stderr=True)
    p = result.parity
    console.print(f"[bold]{fmt}[/] ({result.manifest['precision']}) -> {result.out_dir}")
    for name, n in result.files.items():
        console.print(f"  {name:<24} {_size(n):>10}")
    console.print(
        f"  parity on {p['n']} val images: top-1 agreement {p['agreement']:.2%}, "
        f"max |logit diff| {p['max_abs_diff']:.2e}, accuracy {p['source_accuracy']:.2%} -> "
        f"{p['export_accuracy']:.2%} ({-p['accuracy_drop_points']:+.2f} points)"
    )
    if p.get("over_budget"):
        console.print(f"[bold red]WARNING: outside its accuracy budget ({'; '.join(p['over_budget'])}); "
                      "written because of --allow-drop, and recorded in manifest.json.[/]")
    console.print(f"next: edgetune benchmark {result.out_dir}")


def measure(model: Path, *, device: str = "auto", runs: int = 100, batch: int = 32) -> dict:
    """Load time, batch-1 latency p50/p90 (ms), throughput (img/s) and size of a bundle or run dir."""
    import numpy as np

    from toolkit.runtime import MANIFEST, load_predictor

    t0 = time.perf_counter()
    predictor = load_predictor(model, device=device)
    load_s = time.perf_counter() - t0
    size = predictor.input_size
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    for _ in range(5):
        predictor.logits(one)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        predictor.logits(one)
        times.append(time.perf_counter() - t)
    b = predictor.static_batch or batch
    many = rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8)
    predictor.logits(many)
    reps = max(2, min(10, runs // 10))
    t = time.perf_counter()
    for _ in range(reps):
        predictor.logits(many)
    throughput = reps * b / (time.perf_counter() - t)
    model = Path(model)
    if (model / MANIFEST).is_file():
        files = [model / f for f in json.loads((model / MANIFEST).read_text()).get("files", [])]
    else:
        files = [model / "model.safetensors"]
    ms = np.array(times) * 1e3
    return {
        "model": str(model),
        "description": predictor.describe(),
        "load_seconds": round(load_s, 3),
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "latency_ms_p90": round(float(np.percentile(ms, 90)), 3),
        "runs": runs,
        "throughput_batch": b,
        "throughput_img_s": round(throughput, 1),
        "size_bytes": int(sum(f.stat().st_size for f in files if f.is_file())),
    }


@click.command("benchmark")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@device_option()
@click.option("--runs", type=click.IntRange(min=1), default=100, show_default=True, help="Batch-1 timed runs.")
def benchmark_command(model: Path, as_json: bool, device: str, runs: int) -> None:
    """Load time, batch-1 latency (p50/p90), throughput and size of MODEL (a bundle or a run dir)."""
    result = measure(model, device=device, runs=runs)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result["description"])
    click.echo(f"  load        {result['load_seconds']:.2f} s")
    click.echo(f"  latency     p50 {result['latency_ms_p50']:.2f} ms  p90 {result['latency_ms_p90']:.2f} ms (batch 1)")
    click.echo(f"  throughput  {result['throughput_img_s']:.1f} img/s (batch {result['throughput_batch']})")
    click.echo(f"  size        {_size(result['size_bytes'])}")
