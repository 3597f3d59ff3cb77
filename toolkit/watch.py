"""`edgetune watch`: a model on a live source, results to sinks.

The loop takes the newest frame from the source (stale frames are dropped by the source, see
toolkit.sources), classifies it, and hands (frame, result) to every sink. Sinks are anything with
`write(frame, result)` and `close()`: the JSON-lines and rich-line printers and the --save-video
writer live here; other modules add theirs (MCAP recording, Foxglove live view).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Protocol

import numpy as np

from toolkit.classify import Classification, Classifier
from toolkit.errors import EdgetuneError
from toolkit.sources import Frame, Source


class Sink(Protocol):
    def write(self, frame: Frame, result: Classification) -> None: ...

    def close(self) -> None: ...


def result_record(frame: Frame, result: Classification) -> dict:
    where = {"path": frame.path} if frame.path is not None else {}
    return {"frame": frame.index, "timestamp_ns": frame.timestamp_ns, **where, **result.to_dict()}


class JsonLinesSink:
    """One JSON object per classified frame (flushed: a pipe reader sees each line at once)."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def write(self, frame: Frame, result: Classification) -> None:
        self.stream.write(json.dumps(result_record(frame, result)) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


class RichLineSink:
    """One status line, rewritten in place: label, confidence, latency, rate, dropped frames."""

    def __init__(self, source: Source, console=None) -> None:
        from rich.console import Console
        from rich.live import Live

        self.source = source
        self.live = Live(console=console or Console(stderr=True), refresh_per_second=8, transient=False)
        self.live.start()
        self.count, self.t0 = 0, time.perf_counter()

    def write(self, frame: Frame, result: Classification) -> None:
        from rich.text import Text

        self.count += 1
        rate = self.count / max(time.perf_counter() - self.t0, 1e-9)
        label = "unknown" if result.unknown else result.label
        style = "yellow" if result.unknown else "bold green"
        line = Text.assemble((f"{label:<20}", style), f" {result.confidence:6.3f}",
                             f"  frame {frame.index:>6}  {result.latency_ms:6.1f} ms  {rate:5.1f} fps"
                             f"  dropped {self.source.dropped}")
        self.live.update(line)

    def close(self) -> None:
        self.live.stop()


class VideoSink:
    """The frames with the label drawn, as a video file; written under a temporary name and moved
    into place on close, so an interrupted run never leaves a half-written file under the name."""

    def __init__(self, path: Path, fps: float) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() not in (".mp4", ".avi", ".mkv", ".mov"):
            raise EdgetuneError(f"--save-video {path}: use a .mp4, .avi, .mkv or .mov file name.")
        if not self.path.parent.is_dir():
            raise EdgetuneError(f"--save-video {path}: folder {self.path.parent} does not exist.")
        if self.path.exists():
            raise EdgetuneError(f"--save-video {path} already exists: give a new file name (videos are never replaced).")
        self.tmp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self.fps = fps
        self.writer = None
        self.size: tuple[int, int] | None = None  # (width, height) of the first frame: the video's

    def write(self, frame: Frame, result: Classification) -> None:
        import cv2

        img = frame.image.copy()
        if self.writer is None:
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.suffix.lower() == ".avi" else "mp4v"))
            h, w = img.shape[:2]
            self.size = (w, h)
            self.writer = cv2.VideoWriter(str(self.tmp), fourcc, self.fps, (w, h))
            if not self.writer.isOpened():
                raise EdgetuneError(f"--save-video {self.path}: OpenCV cannot write this format here; try .avi.")
        elif img.shape[1::-1] != self.size:
            # A folder of photos of other sizes: a video has one frame size, and OpenCV drops any
            # other frame without an error, so each is fitted into the first one's (letterboxed).
            img = _letterbox(img, self.size)
        text = f"{'unknown' if result.unknown else result.label} {result.confidence:.2f}"
        scale = max(0.5, img.shape[1] / 640)
        cv2.putText(img, text, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(img, text, (10, int(30 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 200, 255) if result.unknown else (0, 255, 0), 2, cv2.LINE_AA)
        self.writer.write(img)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
            os.replace(self.tmp, self.path)


def _letterbox(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`img` scaled to fit (width, height) `size`, centred on black."""
    import cv2

    w, h = size
    scale = min(w / img.shape[1], h / img.shape[0])
    nw, nh = max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))
    out = np.zeros((h, w, 3), np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


@dataclass
class WatchSummary:
    processed: int = 0
    seen: int = 0  # frames the source delivered to the loop
    dropped: int = 0  # stale frames the source replaced before the loop took them
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    interrupted: bool = False

    def to_json(self) -> dict:
        lat = np.asarray(self.latencies_ms or [np.nan])
        return {"processed": self.processed, "seen": self.seen, "dropped": self.dropped,
                "seconds": round(self.seconds, 3), "fps": round(self.processed / self.seconds, 2) if self.seconds else 0.0,
                "latency_ms_median": round(float(np.median(lat)), 3), "interrupted": self.interrupted}


def watch(classifier: Classifier, source: Source, sinks: Iterable[Sink], *, every: int = 1,
          max_frames: int | None = None, rgb: bool = False) -> WatchSummary:
    """Classify every `every`-th frame the source delivers until it ends, `max_frames` are
    classified, or Ctrl-C. Sinks and the source are closed in every case."""
    if every < 1:
        raise EdgetuneError(f"--every {every}: give 1 (every frame) or more.")
    if max_frames is not None and max_frames < 1:
        raise EdgetuneError(f"--max-frames {max_frames}: give a positive number of frames.")
    sinks = list(sinks)
    summary = WatchSummary()
    t0 = time.perf_counter()
    try:
        for frame in source.frames():
            summary.seen += 1
            if (summary.seen - 1) % every:
                continue
            result = classifier.classify(frame.image, rgb=rgb)
            summary.processed += 1
            summary.latencies_ms.append(result.latency_ms)
            if len(summary.latencies_ms) > 4096:  # bounded: a robot watches for days
                del summary.latencies_ms[:2048]
            for sink in sinks:
                sink.write(frame, result)
            if max_frames and summary.processed >= max_frames:
                break
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.perf_counter() - t0
        summary.dropped = source.dropped
        source.close()
        for sink in sinks:
            sink.close()
    return summary


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (systemd or docker stopping a robot's service) raises
    KeyboardInterrupt as Ctrl-C does, so `watch` closes its sinks and the recording and video are
    complete up to the last frame. For the CLI: a library leaves the process's signals to its caller."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
