"""`edgetune export` and `edgetune benchmark` (added to the main group by toolkit.cli)."""

from __future__ import annotations

import json
import shlex
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
    console.print(f"next: edgetune benchmark {shlex.quote(str(result.out_dir))}")


@click.command("benchmark")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@device_option()
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True, help="Batch-1 timed runs.")
@click.option("--seconds", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Length of the throughput measurement.")
def benchmark_command(model: Path, as_json: bool, device: str, runs: int, seconds: float) -> None:
    """Batch-1 latency (p50/p90/p99, one request, LATENCY hint), throughput, load time and size of MODEL.

    MODEL is a bundle or a run dir. Latency is what robot code calling the model frame by frame
    sees; throughput keeps as many requests in flight as the runtime asks for (as OpenVINO's
    benchmark_app does).
    """
    from toolkit.benchmark import measure

    result = measure(model, device=device, runs=runs, seconds=seconds).as_dict()
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(result["description"])
    click.echo(f"  load        {result['load_seconds']:.2f} s")
    click.echo(f"  latency     p50 {result['latency_ms_p50']:.2f} ms  p90 {result['latency_ms_p90']:.2f} ms  "
               f"p99 {result['latency_ms_p99']:.2f} ms (batch 1, {result['runs']} runs)")
    click.echo(f"  throughput  {result['throughput_img_s']:.1f} img/s ({result['throughput_requests']} request(s) "
               f"of batch {result['throughput_batch']})")
    from toolkit.runtime import MANIFEST

    bundle = (Path(model) / MANIFEST).is_file() or (Path(model).parent / MANIFEST).is_file()
    what = "" if bundle else " (the head's weights: a run shares the machine's cached backbone; export it for the model's size)"
    click.echo(f"  size        {_size(result['size_bytes'])}{what}")
