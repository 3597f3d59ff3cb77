"""`edgetune import-bag`: one image topic of a ROS bag -> a dataset `edgetune train` reads.

Layouts: "folders" writes OUT/<label>/<bag>_<index>_<time>.png|jpg (unlabelled: OUT/<...> flat)
plus OUT/provenance.csv; "csv" writes OUT/images/ plus OUT/labels.csv (path,label and the same
provenance columns), which `train OUT/labels.csv` reads. Messages stream through a small window
of encoder threads (OpenCV releases the GIL), so memory stays flat in bag size; everything is
written under a temporary name and moved into place only when the whole import succeeded.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from toolkit import atomic
from toolkit.errors import EdgetuneError
from toolkit.robotics.bags import Bag, BagMessage
from toolkit.robotics.image_msgs import DEFAULT_PNG_LEVEL, BadMessageError, check_decodable, to_file
from toolkit.robotics.labels import RangeLabeller, check_label_name, read_ranges

logger = logging.getLogger(__name__)

LAYOUTS = ("folders", "csv")
PROVENANCE_COLUMNS = ("path", "label", "bag", "topic", "timestamp_ns", "seconds_from_start",
                      "header_stamp_ns", "frame_id", "encoding")
Progress = Callable[[str, int, int], None]


@dataclass
class ImportOptions:
    labels_csv: Path | None = None  # start,end,label time ranges
    label: str | None = None  # one label for the whole topic
    time_base: str = "auto"  # how labels_csv times are read: auto, bag, start
    every: int = 1  # keep every Nth message
    min_interval: float = 0.0  # seconds between kept frames (near-duplicate thinning)
    max_images: int | None = None
    layout: str = "folders"
    overwrite: bool = False
    png_level: int = DEFAULT_PNG_LEVEL  # deflate level of raw frames' PNGs: 0 fastest, 9 smallest
    workers: int = 0  # encoder threads; 0 = one per core

    def check(self) -> None:
        if self.labels_csv is not None and self.label is not None:
            raise EdgetuneError("Give --labels or --label, not both.")
        if self.every < 1:
            raise EdgetuneError(f"--every must be 1 or more, got {self.every}.")
        if self.min_interval < 0:
            raise EdgetuneError(f"--min-interval must be 0 or more seconds, got {self.min_interval}.")
        if self.max_images is not None and self.max_images < 1:
            raise EdgetuneError(f"--max-images must be 1 or more, got {self.max_images}.")
        if not 0 <= self.png_level <= 9:
            raise EdgetuneError(f"--png-level must be 0 (fastest) to 9 (smallest), got {self.png_level}.")
        if self.layout not in LAYOUTS:
            raise EdgetuneError(f"Unknown layout '{self.layout}': one of {', '.join(LAYOUTS)}.")
        if self.label is not None:
            self.label = check_label_name(self.label, "--label")


@dataclass
class ImportSummary:
    out: Path
    topic: str
    messages: int = 0  # messages on the topic that were looked at
    written: Counter = field(default_factory=Counter)  # label ("" = unlabelled) -> images
    thinned: int = 0  # skipped by --every / --min-interval
    unlabelled: int = 0  # outside every --labels range
    bad: list[str] = field(default_factory=list)  # "index N at T: reason" of skipped broken messages
    index_file: Path | None = None

    @property
    def total(self) -> int:
        return sum(self.written.values())


@dataclass(frozen=True)
class _Pending:
    message: BagMessage
    label: str | None
    future: Future


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgetuneError(f"--out {out} is a file: give a folder for the dataset.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise EdgetuneError(f"--out {out} already holds files: choose a new folder or pass --overwrite.")


def import_bag(bag_path: Path, topic: str | None, out: Path, options: ImportOptions | None = None, *,
               progress: Progress | None = None) -> ImportSummary:
    """Write the images of `topic` in `bag_path` as a dataset at `out` (see module docs)."""
    options = options or ImportOptions()
    options.check()
    out = Path(out)
    _check_out(out, options.overwrite)
    ranges = read_ranges(options.labels_csv) if options.labels_csv else None  # fail before reading
    with Bag(bag_path) as bag:
        topic = topic or bag.only_image_topic("Give --topic")
        summary_topic = bag.image_topic(topic)
        first = bag.first_message(topic)
        if first is not None:
            check_decodable(first.decode(), first.msgtype)
            _warn_low_bit_depth(first, topic)
        if ranges:
            labeller = RangeLabeller(ranges, bag.start_ns, options.time_base)
            labeller.check_overlaps(bag.start_ns, bag.end_ns, str(bag.path))
        else:
            labeller = lambda _t: options.label  # noqa: E731
        summary = ImportSummary(out=out, topic=topic)
        with atomic.staged_dir(out) as stage:
            rows = _write_images(bag, topic, stage, labeller, options, summary, summary_topic.count, progress)
            if not rows:
                raise EdgetuneError(_nothing_written(bag_path, topic, summary, ranges is not None))
            index_name = "labels.csv" if options.layout == "csv" else "provenance.csv"
            _write_index(stage / index_name, rows)
        summary.index_file = out / index_name
    if summary.bad:
        logger.warning("Skipped %d broken messages on %s: %s", len(summary.bad), topic, "; ".join(summary.bad[:5]))
    return summary


def _warn_low_bit_depth(first: BagMessage, topic: str) -> None:
    """16-bit frames are read by their high byte everywhere (training and the robot alike), so a
    driver that puts 10- or 12-bit values in a 16-bit image (mono16 of 0..4095) makes them look
    nearly black (0..15) to the model. Say so once, from the first frame, before any writing."""
    import numpy as np

    from toolkit.robotics.image_msgs import is_compressed, raw_pixels

    if is_compressed(first.msgtype):
        return
    pixels = raw_pixels(first.decode())
    if pixels.dtype == np.uint16 and 0 < int(pixels.max()) < 4096:
        logger.warning("%s: the first 16-bit frame's values stop at %d (10- or 12-bit data?): edgetune reads 16-bit "
                       "images by their high byte, so the model sees them nearly black (0..%d). Have the camera "
                       "driver scale to the full 16-bit range (or publish 8-bit) before recording.",
                       topic, int(pixels.max()), int(pixels.max()) >> 8)


def _nothing_written(bag_path: Path, topic: str, s: ImportSummary, ranged: bool) -> str:
    if ranged and s.unlabelled:
        return (f"No image of {topic} in {bag_path} falls inside a --labels range ({s.unlabelled} outside): "
                f"check the times (bag time in epoch seconds, or seconds from the start with --time-base start).")
    if s.bad:
        return f"Every message of {topic} in {bag_path} is broken, e.g. {s.bad[0]}: nothing written."
    return f"Topic {topic} in {bag_path} has no messages: nothing written."


def _selected(bag: Bag, topic: str, labeller, options: ImportOptions, summary: ImportSummary
              ) -> Iterator[tuple[BagMessage, str | None]]:
    """Messages that pass --every, the label ranges, --min-interval and --max-images, in order."""
    min_gap = round(options.min_interval * 1e9)
    last_kept: dict[str | None, int] = {}
    kept = 0
    for message in bag.messages(topic):
        summary.messages += 1
        if message.index % options.every:
            summary.thinned += 1
            continue
        label = labeller(message.timestamp_ns)
        if label is None and options.labels_csv is not None:
            summary.unlabelled += 1
            continue
        previous = last_kept.get(label)
        if min_gap and previous is not None and message.timestamp_ns - previous < min_gap:
            summary.thinned += 1
            continue
        last_kept[label] = message.timestamp_ns
        yield message, label
        kept += 1
        if options.max_images is not None and kept >= options.max_images:
            return


def _write_images(bag: Bag, topic: str, stage: Path, labeller, options: ImportOptions, summary: ImportSummary,
                  total: int, progress: Progress | None) -> list[dict]:
    from devices.probe import usable_cores

    workers = options.workers or usable_cores()
    rows: list[dict] = []
    window: deque[_Pending] = deque()
    stem = bag.path.stem if bag.path.is_file() else bag.path.name
    made_dirs: set[Path] = set()

    def finish(p: _Pending) -> None:
        try:
            rel, meta = p.future.result()
        except BadMessageError as e:
            summary.bad.append(f"message {p.message.index} at {p.message.timestamp_ns}: {e}")
            return
        summary.written[p.label or ""] += 1
        rows.append(_provenance(rel, p.label, bag, topic, p.message, meta))

    def encode(message: BagMessage, label: str | None) -> tuple[str, dict]:
        msg = message.decode()
        data, ext = to_file(msg, message.msgtype, png_level=options.png_level)
        folder = "images" if options.layout == "csv" else (label or "")
        rel = f"{folder}/{stem}_{message.index:06d}_{message.timestamp_ns}{ext}".lstrip("/")
        with open(stage / rel, "wb") as f:
            f.write(data)
        return rel, _message_meta(msg, message.msgtype)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="import-bag") as pool:
        try:
            for message, label in _selected(bag, topic, labeller, options, summary):
                folder = stage / ("images" if options.layout == "csv" else (label or ""))
                if folder not in made_dirs:
                    folder.mkdir(parents=True, exist_ok=True)
                    made_dirs.add(folder)
                window.append(_Pending(message, label, pool.submit(encode, message, label)))
                # A bounded window keeps memory flat: at most ~2 messages per thread in flight.
                while len(window) > 2 * workers or (window and window[0].future.done()):
                    finish(window.popleft())
                if progress:
                    progress("import", summary.messages, total)
            while window:
                finish(window.popleft())
        finally:
            for p in window:
                p.future.cancel()
    if progress:
        progress("import", summary.messages, max(total, summary.messages))
    return rows


def _message_meta(msg, msgtype: str) -> dict:
    stamp = msg.header.stamp
    encoding = msg.format if msgtype.endswith("CompressedImage") else msg.encoding
    return {"header_stamp_ns": int(stamp.sec) * 10**9 + int(stamp.nanosec),
            "frame_id": msg.header.frame_id, "encoding": encoding}


def _provenance(rel: str, label: str | None, bag: Bag, topic: str, message: BagMessage, meta: dict) -> dict:
    return {"path": rel, "label": label or "", "bag": str(bag.path.resolve()), "topic": topic,
            "timestamp_ns": message.timestamp_ns,
            "seconds_from_start": f"{(message.timestamp_ns - bag.start_ns) / 1e9:.6f}", **meta}


def _write_index(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PROVENANCE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic.write_text(path, buf.getvalue())
