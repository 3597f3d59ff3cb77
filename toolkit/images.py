"""Decode one image file robustly with OpenCV: always HxWx3 uint8 RGB, or a short reason why not.

OpenCV only (no torch, no PIL), so the same code runs on a robot without PyTorch. Grey, 16-bit,
alpha, CMYK, float TIFF and GIF all come out as RGB; zero-byte, truncated and non-image files raise
`ImageReadError` with a reason short enough to list many in one line.
"""

from __future__ import annotations

import re
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


# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
# marker (D0-D7) or another fill 0xFF.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_truncated(data: bytes) -> bool:
    """True when the JPEG's own image data stops before its end-of-image marker.

    Walks the marker segments from the start (skipping each by its length, so an EXIF thumbnail's
    markers are never mistaken for the image's) and follows the scans to the first real EOI.
    Whatever follows that EOI is not the image's business: phone "motion photos" append an MP4,
    other cameras vendor trailers, so trailing bytes never make a file truncated.
    """
    i, n = 2, len(data)
    while i + 2 <= n:
        if data[i] != 0xFF:
            return False  # not a marker where one must be: leave the verdict to the decoder
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker == 0xD9:
            return False
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # stand-alone markers, no length
            i += 2
            continue
        seg_end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if i + 4 > n or seg_end > n:
            return True
        if marker != 0xDA:
            i = seg_end
            continue
        found = _MARKER_IN_SCAN.search(data, seg_end)  # end of this scan's entropy-coded data
        if found is None:
            return True
        i = found.start()
    return True


def _tiff_orientation(tiff: bytes) -> int:
    """EXIF/TIFF tag 0x0112 (Orientation) from IFD0 of a TIFF structure, 1 when absent or broken."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    u16 = lambda o: int.from_bytes(tiff[o : o + 2], order)  # noqa: E731
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for k in range(u16(ifd)):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(tiff):
            break
        if u16(entry) == 0x0112:
            value = u16(entry + 8)
            return value if 1 <= value <= 8 else 1
    return 1


def _exif_orientation(data: bytes) -> int:
    """Orientation stored in a PNG (eXIf chunk), WebP (EXIF chunk) or TIFF file; 1 if none.

    (JPEG's is applied by OpenCV's IMREAD_COLOR itself.)
    """
    if data.startswith(_PNG):
        i = 8
        while i + 8 <= len(data):
            length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
            if kind == b"eXIf":
                return _tiff_orientation(data[i + 8 : i + 8 + length])
            if kind in (b"IDAT", b"IEND"):  # eXIf must come before the image data
                return 1
            i += 12 + length
        return 1
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        i = 12
        while i + 8 <= len(data):
            kind, length = data[i : i + 4], int.from_bytes(data[i + 4 : i + 8], "little")
            if kind == b"EXIF":
                payload = data[i + 8 : i + 8 + length]
                return _tiff_orientation(payload[6:] if payload.startswith(b"Exif\x00\x00") else payload)
            i += 8 + length + (length & 1)
        return 1
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_orientation(data)
    return 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored image upright by its EXIF orientation (1-8), exactly as OpenCV does for JPEG."""
    if orientation in (5, 6, 7, 8):
        img = cv2.transpose(img)
    flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
    return img if flip is None else cv2.flip(img, flip)


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
        if img.size and img.min() >= 0 and img.max() <= 255:
            # 8-bit values in a wider integer type (np.array of a list, a message's int field):
            # scaled by the type's maximum they would all be black.
            return img.astype(np.uint8)
        info = np.iinfo(img.dtype)
        return (np.clip(img.astype(np.float64), 0, None) * (255.0 / info.max) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported pixel type {img.dtype}")


def to_rgb(img: np.ndarray, *, rgb: bool = False) -> np.ndarray:
    """Any decoded image array -> HxWx3 uint8 RGB (see toolkit.preprocess for the exact rules).

    `img` is in OpenCV's channel order (BGR / BGRA) unless `rgb=True` (RGB / RGBA). Grey becomes
    three equal channels, 16-bit keeps its high byte, alpha is flattened onto white in integers.
    """
    if img is None:  # what cv2.imread and a failed VideoCapture.read() give
        raise ValueError("expected an HxW or HxWxC image, got None (a frame the camera or file did not deliver)")
    if isinstance(img, (bytes, bytearray)):
        raise ValueError("expected an HxW or HxWxC image, got encoded bytes: decode them first (cv2.imdecode)")
    img = np.asarray(img)
    if img.ndim not in (2, 3) or img.size == 0:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {img.shape}")
    img = _to_uint8(img)
    if img.ndim == 2 or img.shape[2] == 1:
        return cv2.cvtColor(np.ascontiguousarray(img.reshape(img.shape[:2])), cv2.COLOR_GRAY2RGB)
    if img.shape[2] == 2:  # grey + alpha
        return to_rgb(cv2.merge([img[:, :, 0]] * 3 + [img[:, :, 1]]), rgb=True)
    if img.shape[2] not in (3, 4):
        raise ValueError(f"{img.shape[2]} channels (expected 1, 2, 3 or 4)")
    colour = img[:, :, :3] if rgb else img[:, :, 2::-1]
    if img.shape[2] == 4:
        # Integer blend, so any implementation gets the same bytes: (c*a + bg*(255-a) + 127) // 255.
        alpha = img[:, :, 3:4].astype(np.uint32)
        blended = (colour.astype(np.uint32) * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
        return blended.astype(np.uint8)
    return np.ascontiguousarray(colour)


def read_image(path: Path) -> np.ndarray:
    """Decode one image file at full resolution to HxWx3 uint8 RGB, or raise ImageReadError.

    Always the whole image, never OpenCV's reduced-size JPEG decode: that gives different pixels
    than decoding a camera frame or following manifest.json, so a model would see two inputs.
    """
    path = Path(path)
    return _decode(path, _read_bytes(path))


def check_image(path: Path) -> None:
    """Raise ImageReadError for a file `read_image` would refuse, keeping no pixels.

    JPEGs (most photo sets) get the same structure check, then libjpeg's 1/8-scale greyscale
    decode: it still entropy-decodes every byte of the image data, where broken files fail, but
    skips most of the inverse DCT and colour work. Other formats are decoded in full.
    """
    path = Path(path)
    data = _read_bytes(path)
    if not data.startswith(_JPEG):
        _decode(path, data)
        return
    _check_jpeg(path, data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
    if img is None or img.size == 0:
        raise ImageReadError(path, _describe_undecodable(data))


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()  # Python I/O, not cv2.imread: unicode paths work on every OS
    except OSError as e:
        raise ImageReadError(path, f"cannot open file ({e.strerror or e})") from None
    if not data:
        raise ImageReadError(path, "zero-byte file")
    return data


def _check_jpeg(path: Path, data: bytes) -> None:
    # libjpeg fills a truncated JPEG with grey instead of failing: check the structure first.
    if _jpeg_truncated(data):
        raise ImageReadError(path, "truncated JPEG (image data ends before its end-of-image marker)")


def _decode(path: Path, data: bytes) -> np.ndarray:
    buf = np.frombuffer(data, np.uint8)
    if data.startswith(_JPEG):
        _check_jpeg(path, data)
        # JPEG has no alpha or >8-bit depth to inspect; IMREAD_COLOR also converts CMYK and
        # applies the EXIF orientation, as photo viewers do.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    else:
        if data.startswith(_PNG) and data.rfind(b"IEND") == -1:
            raise ImageReadError(path, "truncated PNG (no IEND chunk)")
        # UNCHANGED keeps alpha and 16-bit depth so they can be converted properly below.
        img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        if img is None and data.startswith(_GIF):
            img = _decode_gif_fallback(buf)
        if img is not None and img.size:
            # UNCHANGED skips the EXIF orientation OpenCV applies to colour reads: apply it here.
            img = apply_orientation(img, _exif_orientation(data))
    if img is None or img.size == 0:
        raise ImageReadError(path, _describe_undecodable(data))
    try:
        return to_rgb(img)
    except (ValueError, cv2.error) as e:
        raise ImageReadError(path, f"unsupported image format ({e})") from None
