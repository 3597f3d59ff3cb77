"""The one preprocessing: how an image file or a frame in memory becomes the model's input.

Training (its clean views), evaluate, predict, export calibration and parity, the runtime
Predictor and the robot-side API all go through `model_input` (or its two halves: `load_image` /
`to_rgb`, then `resize_and_crop`), so a model sees the same bytes whichever way an image arrives.
`describe(size)` states the rule in manifest.json precisely enough for a C++ node to reproduce it
bit-exactly with OpenCV:

    decode   OpenCV imdecode at full resolution (never a reduced-size JPEG decode). JPEG:
             IMREAD_COLOR (EXIF orientation applied, CMYK and grey converted); other formats:
             IMREAD_UNCHANGED (alpha and 16-bit kept for the steps below), then the EXIF
             orientation of PNG eXIf / WebP EXIF / TIFF IFD0 applied the way OpenCV does for JPEG.
    depth    16-bit: value >> 8; float: x*255 (x in 0..1) rounded; other ints: as they are where all
             lie in 0..255, else scaled to 0..255 by the type's maximum.
    channels grey -> three equal channels; alpha flattened onto white with integers:
             out = (c*a + 255*(255-a) + 127) // 255; colour order RGB.
    resize   shorter side -> S = round(size / 0.875); longer side L' = (L*S*2 + s) // (2*s)
             (integer round-half-up of L*S/s, s = the shorter side); cv::resize INTER_AREA when
             shrinking, INTER_LINEAR when enlarging, nothing when s == S.
    crop     centre size x size: top = (H' - size) // 2, left = (W' - size) // 2.
    correct  only in a run adapted to a new camera (`edgetune adapt`, record "camera_correction"):
             out[..., c] = lut[c][view[..., c]], a per-channel 256-entry table (cv::LUT) that
             undoes the new camera's tone curve and white balance. Training images never get it.
    tensor   uint8 HxWx3 RGB view; exported models take it as float32 NCHW 0..255 and normalise
             inside the model.

OpenCV and numpy only: this runs on a robot without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np

from toolkit.images import ALPHA_BACKGROUND, read_image, to_rgb

# ImageNet convention: the view crops 87.5% of the resized shorter side (224 of 256).
EVAL_CROP_FRACTION = 0.875
# Bumped whenever the bytes a given image turns into change; recorded in runs and bundles.
PREPROCESSING_VERSION = 2

ImageLike = Union[str, Path, np.ndarray]

__all__ = ["model_input", "load_image", "to_rgb", "resize_and_crop", "eval_view", "eval_resize_shorter",
           "shrink", "describe", "correction_record", "correction_table", "apply_correction", "PREPROCESSING_VERSION"]


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file at full resolution to HxWx3 uint8 RGB (ImageReadError if it cannot)."""
    return read_image(Path(path))


def model_input(image: ImageLike, size: int, *, rgb: bool = False) -> np.ndarray:
    """The model's uint8 size x size x 3 RGB view of `image`: the one preprocessing.

    `image` is a file path (decoded by `load_image`) or an array as OpenCV gives it: BGR/BGRA,
    grey, 8 or 16 bit. Pass `rgb=True` for RGB/RGBA arrays (PIL, imageio, ROS rgb8).
    """
    if isinstance(image, (str, Path)):
        img = load_image(image)
    else:
        img = to_rgb(image, rgb=rgb)
    return resize_and_crop(img, size)


def eval_resize_shorter(size: int) -> int:
    """The shorter side an image is resized to before the centre crop of `size`."""
    return round(size / EVAL_CROP_FRACTION)


def _scaled_size(h: int, w: int, target: int) -> tuple[int, int]:
    """(height, width) with the shorter side == target; the longer one rounded half up, in integers."""
    short = min(h, w)
    scale = lambda n: target if n == short else (n * target * 2 + short) // (2 * short)  # noqa: E731
    return scale(h), scale(w)


def resize_shorter(img: np.ndarray, target: int) -> np.ndarray:
    """Resize so the shorter side is `target` (INTER_AREA down, INTER_LINEAR up, see module docs)."""
    h, w = img.shape[:2]
    new_h, new_w = _scaled_size(h, w, target)
    if (new_h, new_w) == (h, w):
        return img
    interp = cv2.INTER_AREA if min(h, w) > target else cv2.INTER_LINEAR
    return cv2.resize(img, (new_w, new_h), interpolation=interp)


def resize_and_crop(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 HxWx3 RGB of any size -> the size x size view: resize the shorter side, crop the centre."""
    resized = resize_shorter(img, eval_resize_shorter(size))
    h, w = resized.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


# The deterministic view of augmentation's "none" preset, validation and inference.
eval_view = resize_and_crop


def shrink(img: np.ndarray, shorter: int) -> np.ndarray:
    """Downscale (never upscale) so the shorter side is `shorter`, by the resize rule above.

    Decoded datasets are kept this small. With shorter = eval_resize_shorter(size) the result is
    exactly the image `resize_and_crop` crops from, so the views are identical byte for byte.
    """
    return resize_shorter(img, shorter) if min(img.shape[:2]) > shorter else img


def correction_record(lut: np.ndarray, undoes: str) -> dict[str, Any]:
    """A camera correction as runs and manifests hold it: the (256, 3) table as 3 rows of 256."""
    return {"lut": np.asarray(lut, np.uint8).T.tolist(), "undoes": undoes,
            "step": "after the crop, on the uint8 RGB view: out[..., c] = lut[c][view[..., c]] "
                    "(OpenCV cv::LUT with the three rows as one 3-channel table)"}


def correction_table(record: dict[str, Any] | None) -> np.ndarray | None:
    """The (256, 3) uint8 table of a `correction_record`, or None for none."""
    if not record:
        return None
    table = np.asarray(record["lut"], dtype=np.uint8).T
    if table.shape != (256, 3):
        raise ValueError(f"a camera correction table is 3 rows of 256 values, not {table.T.shape}")
    return np.ascontiguousarray(table)


def apply_correction(view: np.ndarray, table: np.ndarray | None) -> np.ndarray:
    """uint8 HxWx3 (or NxHxWx3) RGB view(s) through a camera correction table (None: unchanged)."""
    if table is None:
        return view
    if view.ndim == 4:
        return np.stack([cv2.LUT(v, table[None]) for v in view])
    return cv2.LUT(np.ascontiguousarray(view), table[None])


def describe(size: int) -> dict[str, Any]:
    """The preprocessing as data, for config.json and manifest.json (see the module docs)."""
    target = eval_resize_shorter(size)
    return {
        "version": PREPROCESSING_VERSION,
        "decode": {
            "library": "OpenCV imdecode, full resolution (no IMREAD_REDUCED_*)",
            "jpeg": "IMREAD_COLOR: EXIF orientation applied, CMYK and grey converted to 3 channels",
            "other_formats": "IMREAD_UNCHANGED (alpha and 16-bit kept for the steps below), then EXIF orientation",
            "bit_depth": "uint16: value >> 8; float: round(clip(x*255, 0, 255)) for 0..1 images; "
                         "other integer types as they are where every value is in 0..255, else scaled by 255/max",
        },
        "exif_orientation": "tag 0x0112 applied for every format: JPEG by OpenCV IMREAD_COLOR; PNG eXIf, WebP EXIF "
                            "and TIFF IFD0 read by edgetune and applied like OpenCV: 2 flip x, 3 flip both, 4 flip y, "
                            "5 transpose, 6 transpose + flip x, 7 transpose + flip both, 8 transpose + flip y",
        "grayscale": "replicated to 3 channels",
        "alpha": {"background": [ALPHA_BACKGROUND] * 3,
                  "formula": "(c*a + 255*(255-a) + 127) // 255 per channel, integer arithmetic"},
        "color": "RGB",
        "frames": "arrays from a camera are OpenCV BGR unless told RGB; they skip the decode step only",
        "resize": {
            "shorter_side": target,
            "longer_side": f"(L*{target}*2 + s) // (2*s): L*{target}/s rounded half up, s = shorter side",
            "interpolation_down": "INTER_AREA",
            "interpolation_up": "INTER_LINEAR",
            "when_equal": "no resize",
        },
        "resize_shorter": target,
        "crop": {"width": size, "height": size, "top": "(H' - size) // 2", "left": "(W' - size) // 2"},
        "center_crop": size,
        "view": "uint8 HxWx3 RGB",
    }
