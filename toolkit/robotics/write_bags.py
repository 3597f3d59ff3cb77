"""Write image bags with the `rosbags` writers: for tests, benchmarks and demo data without a robot.

`write_image_bag(path, "ros2-mcap", {"/camera/image": images})` writes each topic's frames as
sensor_msgs/Image (any encoding of `image_msgs.RAW_ENCODINGS`, optional row padding) or as
CompressedImage (jpeg/png), at a fixed rate from a fixed start time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np

from toolkit.robotics.image_msgs import RAW_ENCODINGS

FORMATS = ("ros1", "ros2-sqlite3", "ros2-mcap")
START_NS = 1_700_000_000 * 10**9  # a plausible wall-clock bag start (Nov 2023)


@dataclass
class TopicSpec:
    """Frames of one topic: `images` are what the encoding stores (H,W[,C]) in its own channel order
    (for jpeg/png: BGR images to encode, or the encoded bytes)."""

    images: Iterable[np.ndarray | bytes]
    encoding: str = "bgr8"  # raw encoding, or "jpeg" / "png" for CompressedImage
    padding: int = 0  # extra bytes at the end of each row (`step` > width * bytes per pixel)
    fps: float = 10.0
    frame_id: str = "camera"
    bigendian: bool = False
    extra: dict = field(default_factory=dict)


def _typestore(fmt: str):
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS1_NOETIC if fmt == "ros1" else Stores.ROS2_HUMBLE)


def _header(ts, stamp_ns: int, frame_id: str, seq: int, ros1: bool):
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    stamp = Time(sec=stamp_ns // 10**9, nanosec=stamp_ns % 10**9)
    return Header(seq=seq, stamp=stamp, frame_id=frame_id) if ros1 else Header(stamp=stamp, frame_id=frame_id)


def image_message(ts, image: np.ndarray, spec: TopicSpec, stamp_ns: int, seq: int, ros1: bool):
    header = _header(ts, stamp_ns, spec.frame_id, seq, ros1)
    if spec.encoding in ("jpeg", "png"):
        if isinstance(image, bytes):  # already encoded (or deliberately broken, in tests)
            data = np.frombuffer(image, np.uint8)
        else:
            data = cv2.imencode(".jpg" if spec.encoding == "jpeg" else ".png", image)[1].reshape(-1)
        return ts.types["sensor_msgs/msg/CompressedImage"](header=header, format=spec.encoding, data=data)
    # Encodings edgetune does not know (e.g. 32FC1) are written as the array's own bytes, for tests.
    dtype = RAW_ENCODINGS[spec.encoding].dtype if spec.encoding in RAW_ENCODINGS else image.dtype
    pixels = np.ascontiguousarray(image, dtype=np.dtype(dtype).newbyteorder(">" if spec.bigendian else "<"))
    h, w = pixels.shape[:2]
    rows = pixels.view(np.uint8).reshape(h, -1)
    if spec.padding:
        rows = np.concatenate([rows, np.full((h, spec.padding), 0xAB, np.uint8)], axis=1)
    return ts.types["sensor_msgs/msg/Image"](
        header=header, height=h, width=w, encoding=spec.encoding, is_bigendian=int(spec.bigendian),
        step=rows.shape[1], data=rows.reshape(-1))


def write_image_bag(path: Path, fmt: str, topics: dict[str, TopicSpec], *,
                    other_topics: Sequence[str] = (), start_ns: int = START_NS) -> Path:
    """Write a bag with the given image topics (and std_msgs/String topics named in `other_topics`).

    Returns what to pass to a reader: the .bag file for ROS 1, the bag folder for ROS 2.
    """
    ros1 = fmt == "ros1"
    ts = _typestore(fmt)
    path = Path(path)
    writer = _open_writer(path, fmt)
    with writer:
        for topic, spec in topics.items():
            msgtype = "sensor_msgs/msg/CompressedImage" if spec.encoding in ("jpeg", "png") else "sensor_msgs/msg/Image"
            conn = writer.add_connection(topic, msgtype, typestore=ts)
            for i, image in enumerate(spec.images):
                t = start_ns + round(i * 1e9 / spec.fps)
                msg = image_message(ts, image, spec, t, i, ros1)
                writer.write(conn, t, ts.serialize_ros1(msg, msgtype) if ros1 else ts.serialize_cdr(msg, msgtype))
        String = ts.types["std_msgs/msg/String"]
        for topic in other_topics:
            conn = writer.add_connection(topic, "std_msgs/msg/String", typestore=ts)
            for i in range(3):
                msg = String(data=f"status {i}")
                data = ts.serialize_ros1(msg, "std_msgs/msg/String") if ros1 else ts.serialize_cdr(msg, "std_msgs/msg/String")
                writer.write(conn, start_ns + i * 10**8, data)
    return path


def _open_writer(path: Path, fmt: str):
    if fmt == "ros1":
        from rosbags.rosbag1 import Writer

        return Writer(path)
    if fmt in ("ros2-sqlite3", "ros2-mcap"):
        from rosbags.rosbag2 import StoragePlugin, Writer

        plugin = StoragePlugin.MCAP if fmt == "ros2-mcap" else StoragePlugin.SQLITE3
        return Writer(path, version=9, storage_plugin=plugin)
    raise ValueError(f"unknown bag format {fmt!r}; one of {FORMATS}")


def storage_file(bag_dir: Path) -> Path:
    """The single .db3/.mcap file inside a ROS 2 bag folder written here."""
    return next(p for p in Path(bag_dir).iterdir() if p.suffix in (".db3", ".mcap"))
