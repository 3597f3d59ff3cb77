"""A recorded bag as a live source for `edgetune watch`: `--source bag:PATH?topic=/camera/image`.

Frames carry bag time. At `rate` 1 (recorded speed; 2 = twice as fast) the bag plays like the
camera did: when the model falls behind, the frames it could not take in time are dropped and
counted (never decoded), exactly as a live camera's stale frames are, so a replay shows what the
robot would have seen. `rate` 0 plays every frame as fast as the model goes (for evaluation).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs

from toolkit.errors import EdgetuneError
from toolkit.robotics.bags import Bag, BagMessage
from toolkit.robotics.image_msgs import BadMessageError, check_decodable, jpeg_bytes, to_bgr
from toolkit.sources import Frame, Source

logger = logging.getLogger(__name__)

SCHEME = "bag"


@dataclass(frozen=True)
class BagFrame(Frame):
    """A Frame plus the message's own JPEG bytes (None for raw images): a recording then stores
    exactly what the robot recorded, without spending a re-encode per frame."""

    jpeg: bytes | None = None


def parse_spec(spec: str, options: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """`bag:PATH?topic=/cam&rate=2` (the `bag:` prefix optional) -> (PATH, {topic, rate, ...}).

    Keyword options (from the command line) win over the query string.
    """
    rest = spec[len(SCHEME) + 1:] if spec.startswith(f"{SCHEME}:") else spec
    path, _, query = rest.partition("?")
    merged: dict[str, Any] = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
    options = dict(options or {})
    # watch --all-frames (realtime=False) means every frame, as fast as the model goes.
    if options.pop("realtime", True) is False and options.get("rate") is None and "rate" not in merged:
        merged["rate"] = 0
    merged.update({k: v for k, v in options.items() if v is not None})
    unknown = set(merged) - {"topic", "rate"}
    if unknown:
        raise EdgetuneError(f"Unknown bag source option(s) {', '.join(sorted(unknown))} in '{spec}': use topic and rate, "
                            f"e.g. bag:run.mcap?topic=/camera/image&rate=1.")
    if not path:
        raise EdgetuneError(f"Bag source '{spec}' names no bag: use bag:PATH?topic=/camera/image.")
    return Path(path), merged


def _rate(value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        rate = -1.0
    if not rate >= 0:
        raise EdgetuneError(f"Bag replay rate '{value}' must be a number >= 0 (1 = recorded speed, 0 = as fast as possible).")
    return rate


class BagSource(Source):
    """Frames of one image topic of a bag, paced by bag time (see module docs)."""

    def __init__(self, path: Path, *, topic: str | None = None, rate: float = 1.0) -> None:
        self.path = Path(path)
        self.rate = _rate(rate)
        self.dropped = 0  # frames skipped because the consumer was late (rate > 0 only)
        self.broken = 0  # messages that did not decode (skipped and counted)
        self._bag = Bag(self.path)
        self._bag.open()  # fail now, with a one-line error, not at the first frame
        try:
            self.topic = topic or self._bag.only_image_topic(f"Give the topic: bag:{self.path}?topic=...")
            self._bag.image_topic(self.topic)
            first = self._bag.first_message(self.topic)
            if first is None:
                raise EdgetuneError(f"Topic {self.topic} in {self.path} has no messages.")
            check_decodable(first.decode(), first.msgtype)
        except BaseException:
            self._bag.close()
            raise
        self.description = f"bag {self.path} {self.topic}"
        self._stop = threading.Event()  # close() from another thread ends a replay, even mid-wait
        self._iterating = False

    def frames(self) -> Iterator[Any]:
        self._iterating = True
        try:
            for message in self._paced(self._bag.messages(self.topic)):
                msg = message.decode()
                try:
                    image = to_bgr(msg, message.msgtype)
                except BadMessageError as e:
                    self.broken += 1
                    logger.warning("Skipped message %d of %s at %d: %s", message.index, self.topic,
                                   message.timestamp_ns, e)
                    continue
                yield BagFrame(image=image, timestamp_ns=message.timestamp_ns, index=message.index,
                               jpeg=jpeg_bytes(msg, message.msgtype))
        finally:
            self._iterating = False
            self._bag.close()
        if self.broken:
            logger.warning("%d broken messages skipped on %s", self.broken, self.topic)

    def _paced(self, messages: Iterator[BagMessage]) -> Iterator[BagMessage]:
        """Messages at `rate` x bag time; while the consumer is late, only the newest due one."""
        if self.rate == 0:
            for message in messages:
                if self._stop.is_set():
                    return
                yield message
            return
        current = next(messages, None)
        if current is None:
            return
        wall0, bag0 = time.monotonic(), current.timestamp_ns

        def due(m: BagMessage) -> float:
            return wall0 + (m.timestamp_ns - bag0) / 1e9 / self.rate

        for following in messages:
            if self._stop.is_set():
                return
            if time.monotonic() >= due(following):  # a newer frame is already due: this one is stale
                self.dropped += 1
                current = following
                continue
            yield from self._at(current, due(current))
            current = following
        if not self._stop.is_set():
            yield from self._at(current, due(current))

    def _at(self, message: BagMessage, when: float) -> Iterator[BagMessage]:
        wait = when - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return
        yield message

    def close(self) -> None:
        self._stop.set()
        if not self._iterating:  # a running frames() closes the bag itself when it sees the stop
            self._bag.close()

    def __enter__(self) -> "BagSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_bag_source(spec: str, options: dict[str, Any] | None = None) -> BagSource:
    """The factory registered with toolkit.sources for the "bag" scheme."""
    path, merged = parse_spec(spec, options)
    return BagSource(path, topic=merged.get("topic"), rate=merged.get("rate", 1.0))
