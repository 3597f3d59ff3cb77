"""Where `watch` gets frames: cameras, video files, RTSP streams, folders, and registered schemes.

    with open_source("0") as source:            # camera index, /dev/videoN, file.mp4, rtsp://..., folder
        for frame in source.frames():           # Frame(image BGR uint8, timestamp_ns, index)
            ...

A live source (camera, stream, or a video file played at its own frame rate) is read by a thread
that keeps only the newest frame: whoever consumes frames always gets the latest one, never a
queue of old ones. Frames replaced before anyone took them are counted in `source.dropped`.
Memory stays one frame however slow the consumer is.

Other modules add schemes with `register_source("bag", factory)`; `open_source("bag:PATH?topic=/x")`
then calls factory("PATH?topic=/x", options).
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://")
OPEN_TIMEOUT_S = 5.0  # a stream that does not answer within this is reported, not waited on


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # HxWx3 uint8 BGR
    timestamp_ns: int  # source time: position in a file, wall clock for live sources
    index: int  # the source's own frame number (gaps = frames dropped as stale or skipped)
    received: float | None = None  # time.perf_counter() when the source had it decoded (live sources)
    path: str | None = None  # the image file it came from (folder sources)


class Source(abc.ABC):
    """A context manager yielding Frames; `dropped` counts stale frames replaced before use."""

    description: str = "source"
    dropped: int = 0

    @abc.abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Frames until the source ends (or is closed)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SourceFactory = Callable[[str, dict], Source]
_SCHEMES: dict[str, SourceFactory] = {}


def register_source(scheme: str, factory: SourceFactory) -> None:
    """`open_source(f"{scheme}:REST", **options)` will call factory("REST", options)."""
    _SCHEMES[scheme.lower()] = factory


def open_source(spec: str, **options) -> Source:
    """A Source for a camera index, /dev/videoN, video file, stream URL, folder or registered scheme.

    Options: realtime (video files: play at the file's frame rate, dropping stale frames; False
    reads every frame), reconnect (stream reconnect attempts), open_timeout (seconds).
    """
    spec = str(spec)
    scheme, sep, rest = spec.partition(":")
    if sep and scheme.lower() in _SCHEMES and not spec.lower().startswith(STREAM_SCHEMES):
        return _SCHEMES[scheme.lower()](rest, options)
    if spec.isdigit():
        return CaptureSource(int(spec), kind="camera", **options)
    if spec.startswith("/dev/video"):
        if not Path(spec).exists():
            raise EdgetuneError(f"Camera {spec} does not exist: list cameras with `ls /dev/video*`.")
        return CaptureSource(spec, kind="camera", **options)
    if spec.lower().startswith(STREAM_SCHEMES):
        return CaptureSource(spec, kind="stream", **options)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return CaptureSource(str(path), kind="file", **options)
    known = ", ".join(sorted(_SCHEMES)) or "none registered"
    raise EdgetuneError(f"--source {spec} is not a camera index, /dev/videoN, video file, stream URL or folder "
                        f"(other schemes: {known}).")


class FolderSource(Source):
    """Every image of a folder in sorted order (not live: nothing is dropped)."""

    def __init__(self, folder: Path) -> None:
        from toolkit.data import list_images

        self.paths = list_images(folder)
        if not self.paths:
            raise EdgetuneError(f"--source {folder} holds no images: give a folder of JPEG/PNG files.")
        self.description = f"folder {folder} ({len(self.paths)} images)"
        self.dropped = 0
        self.unreadable = 0
        self._closed = False

    def frames(self) -> Iterator[Frame]:
        import cv2

        from toolkit.images import ImageReadError, read_image

        for i, p in enumerate(self.paths):
            if self._closed:
                return
            try:
                rgb = read_image(p)
            except ImageReadError as e:
                self.unreadable += 1
                logger.warning("Skipped %s: %s", p, e.reason)
                continue
            yield Frame(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), int(os.stat(p).st_mtime_ns), i, path=str(p))

    def close(self) -> None:
        self._closed = True


class CaptureSource(Source):
    """OpenCV VideoCapture read by a thread that keeps only the newest frame.

    Video files are live too by default (played at their own frame rate, as a camera would
    deliver them); realtime=False reads every frame in order instead. Streams reconnect with
    exponential backoff when they drop.
    """

    def __init__(self, target: int | str, *, kind: str, realtime: bool = True, reconnect: int = 8,
                 open_timeout: float = OPEN_TIMEOUT_S, backoff: tuple[float, float] = (0.5, 8.0)) -> None:
        self.target, self.kind = target, kind
        self.live = kind != "file" or realtime
        self.reconnect, self.open_timeout, self.backoff = reconnect, open_timeout, backoff
        self.description = f"{kind} {target}"
        self.dropped = 0
        self.reconnects = 0
        self._cap = self._open()  # fail now, on the caller's thread, with a clear message
        self.fps = float(self._cap.get(5) or 0.0) or 30.0  # CAP_PROP_FPS; 0 from some cameras
        self._cond = threading.Condition()
        self._latest: Frame | None = None
        self._ended = False
        self._stop = threading.Event()
        self._error: str | None = None
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None  # perf_counter when the reader thread began (file playback clock)

    # -- opening ---------------------------------------------------------------------------
    def _open(self):
        import cv2

        params = []
        if self.kind == "stream":
            ms = int(self.open_timeout * 1000)
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        cap = cv2.VideoCapture(self.target, cv2.CAP_ANY, params)
        if not cap.isOpened():
            cap.release()
            raise EdgetuneError(self._open_error())
        return cap

    def _open_error(self) -> str:
        if self.kind == "camera":
            return (f"Camera {self.target} does not open: check it is connected and not used by another program "
                    "(`ls /dev/video*` lists cameras).")
        if self.kind == "stream":
            return (f"Stream {self.target} did not answer within {self.open_timeout:g} s: check the URL, "
                    "credentials and network (try it with `ffplay`).")
        return f"Video file {self.target} cannot be decoded by OpenCV: convert it to MP4 (H.264) or AVI (MJPG)."

    # -- reading ---------------------------------------------------------------------------
    def _timestamp(self, index: int) -> int:
        if self.kind == "file":
            return int(round(index * 1e9 / self.fps))
        return time.time_ns()

    def _reader(self) -> None:
        """Thread: read frames, keep the newest, count the ones nobody took."""
        index, period = 0, 1.0 / self.fps
        start = self.started_at = time.perf_counter()
        try:
            while not self._stop.is_set():
                ok, image = self._cap.read()
                if not ok:
                    if self.kind == "stream" and self._reopen():
                        continue
                    break
                frame = Frame(image, self._timestamp(index), index, time.perf_counter())
                index += 1
                with self._cond:
                    if self._latest is not None:
                        self.dropped += 1
                    self._latest = frame
                    self._cond.notify()
                if self.kind == "file":  # a camera paces itself; a file plays at its recorded rate
                    delay = start + index * period - time.perf_counter()
                    if delay > 0:
                        self._stop.wait(delay)
        except Exception as e:  # noqa: BLE001 - reported to the consumer, not lost in the thread
            self._error = f"{self.description} failed while reading: {e}"
        finally:
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _reopen(self) -> bool:
        """Reconnect a dropped stream, waiting 0.5, 1, 2, ... s (capped) between tries."""
        delay, most = self.backoff
        self._cap.release()
        for attempt in range(1, self.reconnect + 1):
            logger.warning("%s dropped; reconnecting in %.1f s (try %d of %d)", self.description, delay, attempt,
                           self.reconnect)
            if self._stop.wait(delay):
                return False
            try:
                self._cap = self._open()
                self.reconnects += 1
                return True
            except EdgetuneError:
                delay = min(delay * 2, most)
        logger.warning("%s did not come back after %d tries; stopping.", self.description, self.reconnect)
        return False

    def frames(self) -> Iterator[Frame]:
        if not self.live:
            yield from self._every_frame()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._reader, name="edgetune-capture", daemon=True)
            self._thread.start()
        while True:
            with self._cond:
                while self._latest is None and not self._ended:
                    self._cond.wait(0.5)
                frame, self._latest = self._latest, None
                if frame is None:  # ended and nothing left
                    break
            yield frame
        if self._error:
            raise EdgetuneError(self._error)

    def _every_frame(self) -> Iterator[Frame]:
        index = 0
        while not self._stop.is_set():
            ok, image = self._cap.read()
            if not ok:
                return
            yield Frame(image, self._timestamp(index), index)
            index += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._cap.release()


def _open_bag(rest: str, options: dict) -> Source:
    # ROS bags live in toolkit.robotics (rosbags is imported only when a bag is asked for).
    from toolkit.robotics.bag_source import open_bag_source

    return open_bag_source(rest, options)


register_source("bag", _open_bag)
