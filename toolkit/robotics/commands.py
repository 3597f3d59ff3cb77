"""`edgetune import-bag` (added to the main group by toolkit.cli); bag/MCAP/Foxglove options for watch and predict."""

from __future__ import annotations

import shlex
from pathlib import Path

import click


@click.command("import-bag")
@click.argument("bag", type=click.Path(path_type=Path))
@click.option("--topic", default=None, help="Image topic (sensor_msgs/Image or CompressedImage) [the only one].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Dataset folder to write.")
@click.option("--list", "list_topics", is_flag=True, help="List the bag's topics with type and count, then exit.")
@click.option("--labels", "labels_csv", type=click.Path(path_type=Path), default=None,
              help="CSV of start,end,label rows (seconds: bag time, or from the bag's start).")
@click.option("--time-base", type=click.Choice(["auto", "bag", "start"]), default="auto", show_default=True,
              help="How --labels times are read; auto: >= 1e9 is bag (epoch) time, smaller is from the start.")
@click.option("--label", default=None, help="One label for every image of the topic.")
@click.option("--every", type=click.IntRange(min=1), default=1, show_default=True, help="Keep every Nth message.")
@click.option("--min-interval", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds between kept images (drops near-duplicates of a slow-moving robot).")
@click.option("--max-images", type=click.IntRange(min=1), default=None, help="Stop after this many images.")
@click.option("--layout", type=click.Choice(["folders", "csv"]), default="folders", show_default=True,
              help="folders: OUT/<label>/ + provenance.csv; csv: OUT/images/ + labels.csv.")
@click.option("--png-level", type=click.IntRange(0, 9), default=0, show_default=True,
              help="Deflate level of raw frames' lossless PNGs: 0 writes fastest (files as big as in the bag), 1-9 smaller.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (only once the import succeeded).")
def import_bag_command(bag: Path, topic: str | None, out: Path | None, list_topics: bool, labels_csv: Path | None,
                       time_base: str, label: str | None, every: int, min_interval: float, max_images: int | None,
                       layout: str, png_level: int, overwrite: bool) -> None:
    """Turn the images of one topic of a ROS 1 / ROS 2 bag into a dataset `edgetune train` reads.

    BAG is a ROS 1 .bag, a ROS 2 .db3 or .mcap file, or a ROS 2 bag folder. Images are labelled by
    --labels time ranges, by one --label, or left unlabelled (flat, for adaptation or labelling
    later). Raw images are stored losslessly (PNG), compressed ones byte for byte.
    """
    from toolkit.errors import EdgetuneError
    from toolkit.robotics.bags import list_topics as read_topics

    if list_topics:
        for t in read_topics(bag):
            mark = "  image" if t.is_image else ""
            click.echo(f"{t.name:<40} {t.msgtype:<36} {t.count:>8}{mark}")
        return
    if out is None:
        raise EdgetuneError("Give --out DATA, the dataset folder to write (or --list to see the topics).")
    from toolkit.cli import _RichProgress, _console
    from toolkit.robotics.import_bag import ImportOptions, import_bag

    options = ImportOptions(labels_csv=labels_csv, label=label, time_base=time_base, every=every,
                            min_interval=min_interval, max_images=max_images, layout=layout, overwrite=overwrite,
                            png_level=png_level)
    with _RichProgress() as progress:
        s = import_bag(bag, topic, out, options, progress=progress)
    console = _console()
    per_label = ", ".join(f"{k or '(unlabelled)'} {v}" for k, v in sorted(s.written.items()))
    console.print(f"wrote {s.total} images of {s.topic} to {s.out} ({per_label}); provenance in {s.index_file}")
    skipped = [f"{n} {what}" for n, what in ((s.thinned, "thinned"), (s.unlabelled, "outside the label ranges"),
                                             (len(s.bad), "broken (see the log)")) if n]
    if skipped:
        console.print(f"skipped: {', '.join(skipped)}")
    labelled = [k for k in s.written if k]
    if len(labelled) >= 2:
        train_on = s.index_file if layout == "csv" else s.out
        console.print(f"next: edgetune train {shlex.quote(str(train_on))}")


def record_option(f):
    """--record out.mcap, shared by watch and predict."""
    return click.option("--record", type=click.Path(path_type=Path), default=None,
                        help="Write frames and predictions to this new MCAP file (open it in Foxglove).")(f)


def foxglove_options(f):
    """--foxglove / --foxglove-port / --foxglove-host for watch."""
    f = click.option("--foxglove-host", default="127.0.0.1", show_default=True,
                     help="Address the live server listens on (0.0.0.0: reachable from other machines).")(f)
    f = click.option("--foxglove-port", type=click.IntRange(0, 65535), default=8765, show_default=True,
                     help="Port of the live Foxglove server.")(f)
    return click.option("--foxglove", is_flag=True,
                        help="Serve frames and predictions live to Foxglove (ws://HOST:PORT).")(f)


def bag_source_options(f):
    """--topic / --rate for `--source bag:PATH` (the same keys the spec's ?query takes)."""
    f = click.option("--rate", type=click.FloatRange(min=0), default=None,
                     help="bag sources: replay speed (1 = as recorded, 0 = as fast as the model goes) [1].")(f)
    return click.option("--topic", default=None, help="bag sources: the image topic to replay.")(f)


def bag_options_for(source: str, topic: str | None, rate: float | None) -> dict:
    """--topic/--rate as open_source options; an error when given for a source that is not a bag."""
    from toolkit.errors import EdgetuneError

    options = {k: v for k, v in (("topic", topic), ("rate", rate)) if v is not None}
    if options and not source.lower().startswith("bag:"):
        raise EdgetuneError(f"--{'/--'.join(options)} apply to bag sources (--source bag:PATH), not to {source}.")
    return options


def open_foxglove_sink(record: Path | None, foxglove: bool = False, port: int = 8765, host: str = "127.0.0.1"):
    """The sink for --record and/or --foxglove (None when neither is asked for)."""
    if record is None and not foxglove:
        return None
    from toolkit.robotics.foxglove_sink import FoxgloveSink

    sink = FoxgloveSink(record=record, port=port if foxglove else None, host=host)
    if foxglove:
        click.echo(f"Foxglove: open connection ws://{host}:{sink.port} (channels /edgetune/image, "
                   f"/edgetune/annotations, /edgetune/prediction)", err=True)
    return sink
