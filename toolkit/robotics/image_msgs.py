"""sensor_msgs/Image and sensor_msgs/CompressedImage to pixels, without ROS (numpy + OpenCV only).

Two uses, two outputs:
- `to_bgr(msg)`: HxWx3 uint8 BGR, what a model and the live sources take (16-bit scaled >> 8,
  alpha dropped, bayer demosaiced).
- `to_file(msg)`: the bytes of an image file that keeps the message's pixels exactly where the
  encoding is lossless (16-bit stays 16-bit, alpha stays), so a dataset holds what the robot saw.
  Compressed messages are passed through byte for byte: re-encoding a JPEG would only lose detail.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from toolkit.errors import EdgetuneError

# Raw frames are stored as PNG without deflate by default: lossless, ~4x faster to write (and
# faster to decode in training) than level 1, and the dataset is as big as the topic was in the
# bag. Levels 1-9 trade that speed for files 2-3x smaller (the "up" filter suits camera frames).
DEFAULT_PNG_LEVEL = 0


def png_params(level: int) -> list[int]:
    row_filter = cv2.IMWRITE_PNG_FILTER_NONE if level == 0 else cv2.IMWRITE_PNG_FILTER_UP
    return [cv2.IMWRITE_PNG_COMPRESSION, int(level), cv2.IMWRITE_PNG_FILTER, row_filter]



_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


class UnknownEncodingError(EdgetuneError):
    """A message's encoding or compressed format is one edgetune cannot decode."""


class BadMessageError(ValueError):
    """One message's payload is inconsistent (too short, undecodable): skipped and counted."""


@dataclass(frozen=True)
class RawEncoding:
    dtype: str  # numpy dtype of one channel, native byte order
    channels: int
    # OpenCV conversion from the stored pixels to BGR (None: already BGR, or grey handled below).
    to_bgr: int | None = None
    # Conversion applied before storing a file (bayer and YUV are demosaiced/converted: no
    # image format holds them, and a dataset of mosaics would train nothing useful).
    to_file: int | None = None
    # Channel swap so files hold the same colours a viewer shows (files are BGR(A) in OpenCV).
    swap_rb: bool = False


def _bayer(code: int, dtype: str) -> RawEncoding:
    return RawEncoding(dtype, 1, to_bgr=code, to_file=code)


# ROS names bayer patterns by the top-left 2x2 block; OpenCV by the second row's, hence the shift
# (the same table as cv_bridge).
_BAYER = {"rggb": cv2.COLOR_BayerBG2BGR, "bggr": cv2.COLOR_BayerRG2BGR,
          "gbrg": cv2.COLOR_BayerGR2BGR, "grbg": cv2.COLOR_BayerGB2BGR}

RAW_ENCODINGS: dict[str, RawEncoding] = {
    "rgb8": RawEncoding("u1", 3, swap_rb=True),
    "bgr8": RawEncoding("u1", 3),
    "rgba8": RawEncoding("u1", 4, swap_rb=True),
    "bgra8": RawEncoding("u1", 4),
    "mono8": RawEncoding("u1", 1),
    "rgb16": RawEncoding("u2", 3, swap_rb=True),
    "bgr16": RawEncoding("u2", 3),
    "rgba16": RawEncoding("u2", 4, swap_rb=True),
    "bgra16": RawEncoding("u2", 4),
    "mono16": RawEncoding("u2", 1),
    "8UC1": RawEncoding("u1", 1),
    "8UC3": RawEncoding("u1", 3),
    "8UC4": RawEncoding("u1", 4),
    "16UC1": RawEncoding("u2", 1),
    "yuv422": RawEncoding("u1", 2, to_bgr=cv2.COLOR_YUV2BGR_UYVY, to_file=cv2.COLOR_YUV2BGR_UYVY),
    "uyvy": RawEncoding("u1", 2, to_bgr=cv2.COLOR_YUV2BGR_UYVY, to_file=cv2.COLOR_YUV2BGR_UYVY),
    "yuv422_yuy2": RawEncoding("u1", 2, to_bgr=cv2.COLOR_YUV2BGR_YUY2, to_file=cv2.COLOR_YUV2BGR_YUY2),
    "yuyv": RawEncoding("u1", 2, to_bgr=cv2.COLOR_YUV2BGR_YUY2, to_file=cv2.COLOR_YUV2BGR_YUY2),
    **{f"bayer_{p}8": _bayer(code, "u1") for p, code in _BAYER.items()},
    **{f"bayer_{p}16": _bayer(code, "u2") for p, code in _BAYER.items()},
}
COMPRESSED_FORMATS = ("jpeg", "png")
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")


def is_compressed(msgtype: str) -> bool:
    return msgtype.endswith("CompressedImage")


def raw_encoding(name: str) -> RawEncoding:
    try:
        return RAW_ENCODINGS[name]
    except KeyError:
        raise UnknownEncodingError(
            f"Unknown image encoding '{name}'. Supported: {', '.join(RAW_ENCODINGS)}."
        ) from None


def raw_pixels(msg) -> np.ndarray:
    """The stored pixels of a sensor_msgs/Image as (H, W) or (H, W, C), row padding removed."""
    enc = raw_encoding(msg.encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    itemsize = np.dtype(enc.dtype).itemsize
    row_bytes = width * enc.channels * itemsize
    data = np.asarray(msg.data, dtype=np.uint8).reshape(-1)
    if height == 0 or width == 0:
        raise BadMessageError("empty image (0 rows or columns)")
    if step < row_bytes:
        raise BadMessageError(f"step {step} is shorter than one row ({width} x {msg.encoding} = {row_bytes} bytes)")
    if data.size < height * step - (step - row_bytes):  # the last row's padding may be cut off
        raise BadMessageError(f"data holds {data.size} bytes, {height} rows of step {step} need {height * step}")
    if data.size < height * step:
        data = np.concatenate([data, np.zeros(height * step - data.size, np.uint8)])
    rows = data[: height * step].reshape(height, step)[:, :row_bytes]
    order = ">" if msg.is_bigendian else "<"
    pixels = np.ascontiguousarray(rows).view(np.dtype(enc.dtype).newbyteorder(order))
    pixels = pixels.astype(np.dtype(enc.dtype), copy=False)  # native byte order for OpenCV
    shape = (height, width) if enc.channels == 1 else (height, width, enc.channels)
    return pixels.reshape(shape)


def _file_pixels(msg) -> np.ndarray:
    enc = raw_encoding(msg.encoding)
    pixels = raw_pixels(msg)
    if enc.to_file is not None:
        return cv2.cvtColor(pixels, enc.to_file)
    if enc.swap_rb:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if enc.channels == 3 else cv2.COLOR_RGBA2BGRA)
    return pixels


def compressed_kind(msg) -> str:
    """'jpeg' or 'png' from the payload's magic bytes (the format string varies by driver)."""
    head = bytes(np.asarray(msg.data[:8], dtype=np.uint8))
    if head.startswith(_JPEG):
        return "jpeg"
    if head.startswith(_PNG):
        return "png"
    fmt = (msg.format or "").strip() or "(empty format)"
    raise UnknownEncodingError(
        f"Unknown compressed image format '{fmt}'. Supported: {', '.join(COMPRESSED_FORMATS)}."
    )


def check_decodable(msg, msgtype: str) -> None:
    """Raise UnknownEncodingError now, before any work, if this topic's images cannot be read."""
    if is_compressed(msgtype):
        compressed_kind(msg)
    else:
        raw_encoding(msg.encoding)


def to_file(msg, msgtype: str, *, png_level: int = DEFAULT_PNG_LEVEL) -> tuple[bytes, str]:
    """(file bytes, extension) holding the message's image; lossless for raw encodings."""
    if is_compressed(msgtype):
        kind = compressed_kind(msg)
        data = np.asarray(msg.data, dtype=np.uint8).tobytes()
        _check_compressed(data, kind)
        return data, ".jpg" if kind == "jpeg" else ".png"
    ok, buf = cv2.imencode(".png", _file_pixels(msg), png_params(png_level))
    if not ok:
        raise BadMessageError("PNG encoding failed")
    return buf.tobytes(), ".png"


def _check_compressed(data: bytes, kind: str) -> None:
    from toolkit.images import _jpeg_truncated

    if kind == "jpeg" and _jpeg_truncated(data):
        raise BadMessageError("truncated JPEG (no end-of-image marker)")
    if kind == "png" and data.rfind(b"IEND") == -1:
        raise BadMessageError("truncated PNG (no IEND chunk)")
    # A reduced decode reads the whole entropy-coded stream (so corrupt data fails) at a
    # fraction of a full decode's cost.
    flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 if kind == "jpeg" else cv2.IMREAD_UNCHANGED
    if cv2.imdecode(np.frombuffer(data, np.uint8), flag) is None:
        raise BadMessageError(f"{kind} data does not decode")


def jpeg_bytes(msg, msgtype: str) -> bytes | None:
    """The JPEG file inside a CompressedImage, None for anything else."""
    if is_compressed(msgtype) and compressed_kind(msg) == "jpeg":
        return np.asarray(msg.data, dtype=np.uint8).tobytes()
    return None


def to_bgr(msg, msgtype: str) -> np.ndarray:
    """HxWx3 uint8 BGR for a model: 16-bit scaled to 8, alpha dropped, bayer/YUV converted."""
    if is_compressed(msgtype):
        compressed_kind(msg)
        img = cv2.imdecode(np.asarray(msg.data, dtype=np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise BadMessageError("compressed data does not decode")
        return img
    enc = raw_encoding(msg.encoding)
    pixels = raw_pixels(msg)
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    if enc.to_bgr is not None:
        return cv2.cvtColor(pixels, enc.to_bgr)
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if enc.swap_rb:
        return cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if enc.channels == 3 else cv2.COLOR_RGBA2BGR)
    return np.ascontiguousarray(pixels[:, :, :3])
