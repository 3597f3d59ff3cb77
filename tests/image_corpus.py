"""A ~50-file corpus of the images users really have, written with OpenCV in the test.

Large phone-size JPEGs (the sizes where a reduced-resolution decode used to kick in), EXIF-rotated
JPEGs (orientations 2-8) and an EXIF-rotated PNG, PNGs with alpha (RGBA and grey+alpha), grey
and 16-bit images, tiny and extreme-aspect images, GIF, WebP, TIFF, BMP and a phone "motion
photo" (a JPEG with an MP4-like trailer). Laid out as ROOT/train/<class> and ROOT/val/<class>.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np


def exif_tiff(orientation: int, *, big_endian: bool = False) -> bytes:
    """A minimal EXIF (TIFF) block holding only the Orientation tag."""
    e = ">" if big_endian else "<"
    head = b"MM\x00*" if big_endian else b"II*\x00"
    return (head + struct.pack(f"{e}I", 8) + struct.pack(f"{e}H", 1)
            + struct.pack(f"{e}HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(f"{e}I", 0))


def jpeg_with_exif(img: np.ndarray, orientation: int, quality: int = 90) -> bytes:
    data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
    payload = b"Exif\x00\x00" + exif_tiff(orientation)
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


def png_with_exif(img: np.ndarray, orientation: int) -> bytes:
    data = cv2.imencode(".png", img)[1].tobytes()
    body = exif_tiff(orientation, big_endian=True)
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk + data[at:]


def grey_alpha_png(grey: np.ndarray, alpha: np.ndarray) -> bytes:
    """PNG colour type 4 (grey + alpha), which OpenCV cannot write, written by hand."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = grey.shape
    rows = np.dstack([grey, alpha]).reshape(h, 2 * w)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def motion_photo(img: np.ndarray, seed: int, trailer: int = 20000) -> bytes:
    """A JPEG followed by random bytes, like the MP4 a phone appends to a 'motion photo'."""
    rng = np.random.default_rng(seed)
    tail = rng.integers(0, 256, trailer, dtype=np.uint8).tobytes()
    return cv2.imencode(".jpg", img)[1].tobytes() + b"\x00\x00\x00\x18ftypmp42" + tail


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like BGR image: smooth colour fields plus fine texture (so resizing matters)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 64), max(2, w // 64), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-24, 25, (h, w, 3))
    return np.clip(img.astype(np.int32) + noise, 0, 255).astype(np.uint8)


def _gif(img: np.ndarray) -> bytes | None:
    ok, buf = cv2.imencode(".gif", img)
    return buf.tobytes() if ok else None


def corpus_files(seed: int = 0) -> dict[str, bytes]:
    """name -> file bytes, 50 files."""
    files: dict[str, bytes] = {}
    enc = lambda ext, img, *p: cv2.imencode(ext, img, *p)[1].tobytes()  # noqa: E731
    # Large JPEGs: 1/2, 1/4, 1/8 reduced decodes used to apply at these sizes (shorter side >= 2x274).
    for i, (h, w) in enumerate([(1536, 2048), (3000, 2250), (1200, 1600), (560, 1030), (4032, 600), (548, 731)]):
        files[f"large_{i}.jpg"] = enc(".jpg", photo(h, w, seed + i), [cv2.IMWRITE_JPEG_QUALITY, 92])
    for o in range(2, 9):
        files[f"exif_{o}.jpg"] = jpeg_with_exif(photo(400, 640, seed + 10 + o), o)
    files["exif_6.png"] = png_with_exif(photo(300, 500, seed + 20), 6)
    for i, (h, w) in enumerate([(300, 400), (64, 48), (900, 700)]):
        bgra = np.dstack([photo(h, w, seed + 30 + i), np.linspace(0, 255, h * w).reshape(h, w).astype(np.uint8)])
        files[f"alpha_{i}.png"] = enc(".png", bgra)
    grey = cv2.cvtColor(photo(320, 480, seed + 40), cv2.COLOR_BGR2GRAY)
    files["grey.jpg"] = enc(".jpg", grey)
    files["grey.png"] = enc(".png", grey)
    files["grey_alpha.png"] = grey_alpha_png(grey, 255 - grey)
    files["deep16.png"] = enc(".png", photo(280, 360, seed + 41).astype(np.uint16) * 257 + 3)
    files["grey16.png"] = enc(".png", grey.astype(np.uint16) * 256 + 77)
    files["rgba16.png"] = enc(".png", np.dstack([photo(200, 300, seed + 42), grey[:200, :300]]).astype(np.uint16) * 257)
    files["one_pixel.png"] = enc(".png", photo(1, 1, seed + 50))
    files["tiny.jpg"] = enc(".jpg", photo(2, 3, seed + 51))
    files["sliver.png"] = enc(".png", photo(7, 300, seed + 52))
    files["tall_sliver.jpg"] = enc(".jpg", photo(500, 9, seed + 53))
    files["small.bmp"] = enc(".bmp", photo(16, 16, seed + 54))
    gif = _gif(photo(120, 160, seed + 55))
    if gif is not None:
        files["anim.gif"] = gif
    files["photo.webp"] = enc(".webp", photo(300, 420, seed + 56), [cv2.IMWRITE_WEBP_QUALITY, 90])
    files["photo.tiff"] = enc(".tiff", photo(310, 410, seed + 57))
    files["motion_photo.jpg"] = motion_photo(photo(600, 800, seed + 58), seed)
    # Ordinary photos to make up the rest, odd sizes and aspects (some long sides round at .5).
    i = 0
    while len(files) < 50:
        h, w = 180 + 37 * i, 240 + 53 * (i % 7)
        files[f"photo_{i}.jpg"] = enc(".jpg", photo(h, w, seed + 100 + i))
        i += 1
    return files


def write_corpus(root: Path, seed: int = 0) -> list[Path]:
    """Write the corpus as ROOT/train/<a|b> and ROOT/val/<a|b> (every class and split non-empty)."""
    paths = []
    for k, (name, payload) in enumerate(sorted(corpus_files(seed).items())):
        folder = root / ("train" if k % 2 == 0 else "val") / ("a" if (k // 2) % 2 == 0 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(payload)
        paths.append(folder / name)
    return sorted(paths)
