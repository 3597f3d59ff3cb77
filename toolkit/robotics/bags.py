"""Read ROS 1 (.bag) and ROS 2 (.db3, .mcap, or a bag folder) recordings without ROS.

`rosbags` does the parsing; this module opens a bag, names its topics, checks that a topic is an
image topic, and streams its messages one at a time (memory stays flat in bag size: rosbags reads
chunk by chunk). Every way a bag can be unreadable becomes one `BagError` naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from toolkit.errors import EdgetuneError, unknown_choice
from toolkit.robotics.image_msgs import IMAGE_TYPES

logger = logging.getLogger(__name__)

BAG_HELP = "a ROS 1 .bag, a ROS 2 .db3 or .mcap file, or a ROS 2 bag folder (with metadata.yaml)"


class BagError(EdgetuneError):
    """A bag is missing, unreadable, or lacks what was asked of it."""


@dataclass(frozen=True)
class TopicSummary:
    name: str
    msgtype: str
    count: int

    @property
    def is_image(self) -> bool:
        return self.msgtype in IMAGE_TYPES


@dataclass(frozen=True)
class BagMessage:
    """One message of a topic; `decode()` deserializes it only when asked (dropped frames never are)."""

    timestamp_ns: int  # bag (receive) time
    index: int  # position in the topic, from 0
    msgtype: str
    raw: bytes
    bag: "Bag"

    def decode(self) -> Any:
        return self.bag._deserialize(self.raw, self.msgtype)


def _reason(err: BaseException) -> str:
    def flat(args) -> list[str]:  # rosbags nests the cause's args tuple inside its own
        return [x for a in args for x in (flat(a) if isinstance(a, tuple) else [str(a)])]

    return (" ".join(flat(err.args)) or type(err).__name__).rstrip(".")


class Bag:
    """An open bag: `with Bag(path) as bag: bag.messages("/camera/image")`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._reader = None

    # -- opening -------------------------------------------------------------------------------
    def __enter__(self) -> "Bag":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        from rosbags.highlevel import AnyReader
        from rosbags.typesys import Stores, get_typestore

        path = self.path
        if not path.exists():
            raise BagError(f"Bag {path} does not exist: pass {BAG_HELP}.")
        if path.is_dir() and not (path / "metadata.yaml").exists():
            inside = sorted(p.name for p in path.iterdir() if p.suffix in (".db3", ".mcap", ".bag"))
            hint = f" Pass a file inside instead: {', '.join(inside)}." if inside else ""
            raise BagError(f"{path} is a folder without metadata.yaml, so not a ROS 2 bag folder.{hint}")
        if path.is_file() and path.suffix not in (".bag", ".db3", ".mcap"):
            raise BagError(f"{path} is not a bag (extension '{path.suffix}'): pass {BAG_HELP}.")
        try:
            # Bags written without message definitions (older ROS 2 .db3) need known types.
            reader = AnyReader([path], default_typestore=get_typestore(Stores.LATEST))
            reader.open()
        except OSError as e:
            if isinstance(e, (PermissionError, IsADirectoryError)):
                raise
            raise self._error(e) from None
        except Exception as e:  # rosbags and its storage backends raise many types on corrupt input
            raise self._error(e) from None
        self._reader = reader

    def close(self) -> None:
        if self._reader is not None:
            reader, self._reader = self._reader, None
            try:
                reader.close()
            except Exception as e:  # noqa: BLE001 - closing a corrupt bag must not hide the first error
                logger.debug("closing %s: %s", self.path, e)

    def _error(self, err: BaseException) -> BagError:
        reason = _reason(err)
        if "profile" in reason.lower():  # an MCAP of Foxglove/protobuf messages, e.g. an edgetune recording
            return BagError(f"Cannot read bag {self.path}: {reason}. Only ROS 2 MCAP recordings are bags "
                            f"(this one is for viewing in Foxglove).")
        hint = {".bag": "a ROS 1 bag cut short can be repaired with `rosbag reindex`",
                ".mcap": "an MCAP cut short can be repaired with `mcap recover`"}.get(
                    self.path.suffix, "a ROS 2 bag cut short can be repaired with `ros2 bag reindex`")
        return BagError(f"Cannot read bag {self.path}: {reason}. Is it complete? ({hint})")

    # -- what is inside --------------------------------------------------------------------------
    @property
    def start_ns(self) -> int:
        return int(self._reader.start_time)

    @property
    def end_ns(self) -> int:
        return int(self._reader.end_time)

    def topics(self) -> list[TopicSummary]:
        return sorted((TopicSummary(name, info.msgtype or "(mixed types)", int(info.msgcount))
                       for name, info in self._reader.topics.items()), key=lambda t: t.name)

    def image_topic(self, topic: str) -> TopicSummary:
        """The summary of `topic`, which must exist and carry Image or CompressedImage messages."""
        by_name = {t.name: t for t in self.topics()}
        images = [t.name for t in by_name.values() if t.is_image]
        if topic not in by_name:
            if not images:
                raise BagError(f"Topic '{topic}' is not in {self.path}, which has no image topics "
                               f"(topics: {', '.join(by_name) or 'none'}).")
            raise unknown_choice("topic", topic, images, where=f" in {self.path}")
        summary = by_name[topic]
        if not summary.is_image:
            hint = f" Image topics: {', '.join(images)}." if images else " The bag has no image topics."
            raise BagError(f"Topic '{topic}' in {self.path} carries {summary.msgtype}, not "
                           f"sensor_msgs/Image or CompressedImage.{hint}")
        return summary

    def only_image_topic(self, how_to_choose: str) -> str:
        """The bag's one image topic; with none or several, an error that lists them and says
        `how_to_choose` (e.g. "Give --topic")."""
        images = [t.name for t in self.topics() if t.is_image]
        if len(images) == 1:
            logger.info("Using the only image topic of %s: %s", self.path, images[0])
            return images[0]
        raise BagError(f"{how_to_choose}: {self.path} has image topics {', '.join(images) or '(none)'}.")

    # -- reading --------------------------------------------------------------------------------
    def messages(self, topic: str) -> Iterator[BagMessage]:
        """The messages of one image topic in bag-time order, undecoded until asked."""
        summary = self.image_topic(topic)
        connections = [c for c in self._reader.connections if c.topic == topic]
        stream = self._reader.messages(connections=connections)
        index = 0
        while True:
            try:
                item = next(stream, None)
            except Exception as e:  # a corrupt chunk in the middle of the bag
                raise self._error(e) from None
            if item is None:
                return
            _, timestamp, raw = item
            yield BagMessage(int(timestamp), index, summary.msgtype, raw, self)
            index += 1

    def first_message(self, topic: str) -> BagMessage | None:
        stream = self.messages(topic)
        try:
            return next(stream, None)
        finally:
            stream.close()  # releases the reader's cursor before the real pass starts

    def _deserialize(self, raw: bytes, msgtype: str) -> Any:
        try:
            return self._reader.deserialize(raw, msgtype)
        except Exception as e:
            raise self._error(e) from None


def list_topics(path: Path) -> list[TopicSummary]:
    with Bag(path) as bag:
        return bag.topics()
