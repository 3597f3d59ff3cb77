"""Decode one image file robustly with OpenCV: always HxWx3 uint8 RGB, or a short reason why not.

OpenCV only (no torch, no PIL), so the same code runs on a robot without PyTorch. Grey, 16-bit,
alpha, CMYK, float TIFF and GIF all come out as RGB; zero-byte, truncated and non-image files raise
`ImageReadError` with a reason short enough to list many in one line.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from toolkit.errors import DataError

# Transparent pixels become white: cut-out product and object photos are made to be shown on white
# pages, so white is what the subject was framed against; the same rule applies at inference.
ALPHA_BACKGROUND = 255


class ImageReadError(DataError):
    """One image file cannot be used; `reason` is short enough to list many in one line."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"Cannot read image {self.path}: {reason}")



_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"
_GIF = (b"GIF87a", b"GIF89a")


def _jpeg_truncated(data: bytes) -> bool:
    # Entropy-coded data stuffs every 0xFF with 0x00, so a real EOI (FFD9) must follow the last
    # start-of-scan (FFDA); trailing padding or vendor trailers after the EOI are allowed.
    eoi = data.rfind(b"\xff\xd9")
    return eoi == -1 or eoi < data.rfind(b"\xff\xda")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first SOF marker, or None; lets a big JPEG decode reduced."""
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big")
        i += 2 + seg_len
    return None


def _describe_undecodable(data: bytes) -> str:
    head = data[:512].lstrip()
    if head[:1] == b"<":
        return "not an image (HTML/XML text, maybe a failed download)"
    try:
        head.decode("utf-8")
        return "not an image (text file)"
    except UnicodeDecodeError:
        return "not an image (cannot decode)"


def _decode_gif_fallback(buf: np.ndarray) -> np.ndarray | None:
    # Builds without the GIF codec: try the multi-page decoder, which some builds route differently.
    ok, frames = cv2.imdecodemulti(buf, cv2.IMREAD_COLOR) if hasattr(cv2, "imdecodemulti") else (False, [])
    return frames[0] if ok and frames else None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)  # keep the full range: 65535 -> 255, not clipped
    if img.dtype.kind == "f":
        scale = 255.0 if np.nanmax(img) <= 1.0 else 1.0  # float images are 0..1 by convention
        return np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8)
    if img.dtype.kind in "iu":
        info = np.iinfo(img.dtype)
        return (np.clip(img.astype(np.float64), 0, None) * (255.0 / info.max) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {img.dtype}")


def _to_rgb(img: np.ndarray) -> np.ndarray:
    img = _to_uint8(img)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) * (1.0 / 255.0)
        bgr = img[:, :, :3].astype(np.float32) * alpha + ALPHA_BACKGROUND * (1.0 - alpha)
        return cv2.cvtColor((bgr + 0.5).astype(np.uint8), cv2.COLOR_BGR2RGB)
    if img.shape[2] == 2:  # grey + alpha
        return _to_rgb(cv2.merge([img[:, :, 0]] * 3 + [img[:, :, 1]]))
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2RGB)


def read_image(path: Path, *, min_side: int | None = None) -> np.ndarray:
    """Decode one image file to HxWx3 uint8 RGB, or raise ImageReadError saying why not.

    `min_side` lets large JPEGs decode at 1/2, 1/4 or 1/8 scale while the shorter side stays at
    least `min_side` (several times faster for phone photos); callers still resize exactly.
    """
    path = Path(path)
    try:
        data = path.read_bytes()  # Python I/O, not cv2.imread: unicode paths work on every OS
    except OSError as e:
        raise ImageReadError(path, f"cannot open file ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(path, "zero-byte file")
    buf = np.frombuffer(data, np.uint8)
    if data.startswith(_JPEG):
        # Older OpenCV decodes truncated JPEGs with grey fill instead of failing.
        if _jpeg_truncated(data):
            raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
        # JPEG has no alpha or >8-bit depth to inspect; IMREAD_COLOR also converts CMYK and
        # applies the EXIF orientation, as photo viewers do.
        flag = cv2.IMREAD_COLOR
        size = _jpeg_size(data) if min_side else None
        if size:
            for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                                    (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if min(size) // factor >= min_side:
                    flag = reduced
                    break
        img = cv2.imdecode(buf, flag)
    else:
        if data.startswith(_PNG) and data.rfind(b"IEND") == -1:
            raise ImageReadError(path, "truncated PNG (no IEND chunk)")
        # UNCHANGED keeps alpha and 16-bit depth so they can be converted properly below.
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None and data.startswith(_GIF):
            img = _decode_gif_fallback(buf)
    if img is None or img.size == 0:
        raise ImageReadError(path, _describe_undecodable(data))
    try:
        return _to_rgb(img)
    except (ValueError, cv2.error) as e:
        raise ImageReadError(path, f"unsupported image format ({e})") from None


def shrink(img: np.ndarray, *, min_side: int | None = None, max_side: int | None = None) -> np.ndarray:
    """Downscale (never upscale) so the shorter side is <= min_side and the longer <= max_side."""
    h, w = img.shape[:2]
    scale = 1.0
    if min_side:
        scale = min(scale, min_side / min(h, w))
    if max_side:
        scale = min(scale, max_side / max(h, w))
    if scale >= 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)
