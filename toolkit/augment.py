"""OpenCV augmentation, seeded and on the fly (the albumentations pattern).

Each transform class draws its random parameters in `sample(rng, height, width)` (None means it
is skipped this time) and hands them to a pure `apply(img, **params)` that only moves pixels, never
modifies its input and keeps uint8 HxWx3. `Compose` fuses consecutive geometric transforms (crop,
flips, rotation, zoom) into a single `cv2.warpAffine`, so a view costs one resampling pass.

No torch here: the same code runs on a device that learns without PyTorch.
"""

from __future__ import annotations

import abc
import copy
import inspect
import math
from typing import Any, ClassVar, Sequence

import cv2
import numpy as np

from toolkit.errors import EdgetuneError, unknown_choice

# The deterministic view (validation, inference, the "none" preset) is the one preprocessing.
from toolkit.preprocess import eval_resize_shorter, eval_view  # noqa: F401


# ------------------------------------------------------------------------------------ transforms


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EdgetuneError(f"Augmentation setting '{name}' must be a [low, high] pair, not {value!r}") from None
    if lo > hi:
        raise EdgetuneError(f"Augmentation setting '{name}' must have low <= high, got {value!r}")
    return lo, hi


class Transform(abc.ABC):
    """Base: `p` is the probability of applying; subclasses define `name`, `draw` and `apply`."""

    name: ClassVar[str] = ""
    geometric: ClassVar[bool] = False  # True: also provides matrix(), so Compose can fuse it
    randomised: ClassVar[bool] = True  # False: with p=1 the output does not depend on the seed
    needs_size: ClassVar[bool] = False  # True: build_augmentation passes the output size

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise EdgetuneError(f"Augmentation '{self.name}': p must be between 0 and 1, got {p}")
        self.p = float(p)

    def sample(self, rng: np.random.Generator, height: int, width: int) -> dict | None:
        if self.p < 1.0 and rng.random() >= self.p:
            return None
        return self.draw(rng, height, width)

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        return {}

    @staticmethod
    @abc.abstractmethod
    def apply(img: np.ndarray, **params: Any) -> np.ndarray:
        """Pure: a new array with the pixels moved; never modifies `img`."""

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sample and apply; returns the input itself (unmodified) when skipped."""
        params = self.sample(rng, *img.shape[:2])
        return img if params is None else self.apply(img, **params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _affine_about_center(height: int, width: int, angle: float, scale: float) -> np.ndarray:
    m = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), angle, scale)
    return np.vstack([m, [0.0, 0.0, 1.0]])


def _warp(img: np.ndarray, m: np.ndarray, height: int, width: int) -> np.ndarray:
    return cv2.warpAffine(img, m[:2], (width, height), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)


def resized_crop(img: np.ndarray, *, top: int, left: int, crop_h: int, crop_w: int, size: int) -> np.ndarray:
    crop = img[top : top + crop_h, left : left + crop_w]
    interp = cv2.INTER_AREA if crop_h > size and crop_w > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


class RandomResizedCrop(Transform):
    """Random area fraction and aspect ratio, resized to size x size (torchvision's algorithm).

    When skipped (p < 1), Compose uses eval_view, so the output is always size x size.
    """

    name = "crop"
    geometric = True
    needs_size = True

    def __init__(self, size: int = 224, p: float = 1.0, scale: Sequence[float] = (0.35, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        super().__init__(p)
        self.size = int(size)
        self.scale = _pair(scale, "crop.scale")
        self.ratio = _pair(ratio, "crop.ratio")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0 or self.ratio[0] <= 0:
            raise EdgetuneError(f"Augmentation 'crop': scale must lie in (0, 1] and ratio be > 0: {scale}, {ratio}")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return {"top": top, "left": left, "crop_h": h, "crop_w": w, "size": self.size}
        # Extreme aspect ratios: fall back to the largest centred crop within the ratio range.
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = min(width, round(height * aspect)), min(height, round(width / aspect))
        return {"top": (height - h) // 2, "left": (width - w) // 2, "crop_h": h, "crop_w": w,
                "size": self.size}

    apply = staticmethod(resized_crop)

    @staticmethod
    def matrix(params: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
        size = params["size"]
        sx, sy = size / params["crop_w"], size / params["crop_h"]
        # Pixel centres map like cv2.resize: dst = (src - left + 0.5) * s - 0.5
        m = np.array([[sx, 0.0, (0.5 - params["left"]) * sx - 0.5],
                      [0.0, sy, (0.5 - params["top"]) * sy - 0.5],
                      [0.0, 0.0, 1.0]])
        return m, size, size


def hflip(img: np.ndarray) -> np.ndarray:
    return cv2.flip(img, 1)


def vflip(img: np.ndarray) -> np.ndarray:
    return cv2.flip(img, 0)


class HorizontalFlip(Transform):
    name = "hflip"
    geometric = True
    randomised = False
    apply = staticmethod(hflip)

    @staticmethod
    def matrix(params: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
        return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), height, width


class VerticalFlip(Transform):
    """Off in every preset: most photos have a meaningful up; enable for overhead or microscope views."""

    name = "vflip"
    geometric = True
    randomised = False
    apply = staticmethod(vflip)

    @staticmethod
    def matrix(params: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
        return np.array([[1.0, 0.0, 0.0], [0.0, -1.0, height - 1.0], [0.0, 0.0, 1.0]]), height, width


def rotate(img: np.ndarray, *, angle: float) -> np.ndarray:
    h, w = img.shape[:2]
    return _warp(img, _affine_about_center(h, w, angle, 1.0), h, w)


class Rotate(Transform):
    """Rotate about the centre by up to +-limit degrees; corners are filled by reflection."""

    name = "rotate"
    geometric = True

    def __init__(self, p: float = 0.5, limit: float = 15.0) -> None:
        super().__init__(p)
        self.limit = float(limit)

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        return {"angle": float(rng.uniform(-self.limit, self.limit))}

    apply = staticmethod(rotate)

    @staticmethod
    def matrix(params: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
        return _affine_about_center(height, width, params["angle"], 1.0), height, width


def zoom(img: np.ndarray, *, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    return _warp(img, _affine_about_center(h, w, 0.0, factor), h, w)


class Scale(Transform):
    """Zoom in (>1) or out (<1, borders reflected) about the centre; the size stays the same."""

    name = "scale"
    geometric = True

    def __init__(self, p: float = 0.5, scale: Sequence[float] = (0.85, 1.15)) -> None:
        super().__init__(p)
        self.scale = _pair(scale, "scale.scale")
        if self.scale[0] <= 0:
            raise EdgetuneError(f"Augmentation 'scale': factors must be > 0, got {scale}")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        # Uniform in log space so zooming in and out are equally likely.
        return {"factor": float(math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1]))))}

    apply = staticmethod(zoom)

    @staticmethod
    def matrix(params: dict, height: int, width: int) -> tuple[np.ndarray, int, int]:
        return _affine_about_center(height, width, 0.0, params["factor"]), height, width


# BT.601 luma, as in cv2.COLOR_RGB2GRAY; images here are RGB.
_LUMA = np.array([0.299, 0.587, 0.114])


def color_jitter(img: np.ndarray, *, brightness: float, contrast: float, saturation: float,
                 hue: float) -> np.ndarray:
    """Brightness, contrast, saturation and hue as ONE 3x4 colour matrix (a single cv2.transform).

    All four are linear in RGB: hue is a rotation about the grey axis (as in YIQ space), so they
    compose into one matrix instead of an HSV round trip.
    """
    grey = np.outer(np.ones(3), _LUMA)
    sat = saturation * np.eye(3) + (1.0 - saturation) * grey
    theta = 2.0 * math.pi * hue
    u = np.ones(3) / math.sqrt(3.0)  # rotation axis: the grey diagonal
    cross = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    rot = math.cos(theta) * np.eye(3) + math.sin(theta) * cross + (1 - math.cos(theta)) * np.outer(u, u)
    mean_luma = float(np.dot(cv2.mean(img)[:3], _LUMA)) * brightness
    m = np.zeros((3, 4))
    m[:, :3] = contrast * brightness * (rot @ sat)
    m[:, 3] = (1.0 - contrast) * mean_luma
    return cv2.transform(img, m)


class ColorJitter(Transform):
    """Factors drawn from [1 - x, 1 + x]; hue shift from [-hue, hue] of a full turn."""

    name = "color"

    def __init__(self, p: float = 0.8, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3, hue: float = 0.05) -> None:
        super().__init__(p)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)
        if min(self.brightness, self.contrast, self.saturation, self.hue) < 0 or self.hue > 0.5:
            raise EdgetuneError("Augmentation 'color': amounts must be >= 0 and hue <= 0.5")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        u = rng.uniform(-1.0, 1.0, size=4)
        return {"brightness": 1.0 + self.brightness * u[0], "contrast": 1.0 + self.contrast * u[1],
                "saturation": 1.0 + self.saturation * u[2], "hue": self.hue * u[3]}

    apply = staticmethod(color_jitter)


def gaussian_noise(img: np.ndarray, *, sigma: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(img.shape, dtype=np.float32)
    out = cv2.scaleAdd(noise, float(sigma), img.astype(np.float32))
    return np.clip(out, 0, 255, out=out).astype(np.uint8)


class GaussianNoise(Transform):
    """Additive sensor-like noise; sigma in pixel levels (0-255)."""

    name = "noise"

    def __init__(self, p: float = 0.1, sigma: Sequence[float] = (2.0, 8.0)) -> None:
        super().__init__(p)
        self.sigma = _pair(sigma, "noise.sigma")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        # The noise pattern itself comes from a drawn seed so apply() stays pure and repeatable.
        return {"sigma": float(rng.uniform(*self.sigma)), "seed": int(rng.integers(0, 2**31))}

    apply = staticmethod(gaussian_noise)


def gaussian_blur(img: np.ndarray, *, ksize: int, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(img, (ksize, ksize), sigma)


class Blur(Transform):
    """Gaussian blur with an odd kernel size from `ksize` (defocus, motion-free camera shake)."""

    name = "blur"

    def __init__(self, p: float = 0.1, ksize: Sequence[int] = (3, 5)) -> None:
        super().__init__(p)
        lo, hi = _pair(ksize, "blur.ksize")
        self.ksize = (int(lo), int(hi))
        self._odd = [k for k in range(self.ksize[0], self.ksize[1] + 1) if k % 2 == 1]
        if not self._odd:
            raise EdgetuneError(f"Augmentation 'blur': ksize {list(ksize)} holds no odd size (try [3, 5])")

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        k = int(rng.choice(self._odd))
        # OpenCV's default sigma for this kernel, jittered, so one kernel size still varies.
        sigma = (0.3 * ((k - 1) * 0.5 - 1) + 0.8) * rng.uniform(0.7, 1.3)
        return {"ksize": k, "sigma": float(sigma)}

    apply = staticmethod(gaussian_blur)

    def __repr__(self) -> str:
        return f"Blur(p={self.p!r}, ksize={self.ksize!r})"


def cutout(img: np.ndarray, *, holes: list[tuple[int, int, int, int]], fill: str,
           colors: list[tuple[int, int, int]]) -> np.ndarray:
    out = img.copy()
    mean = tuple(int(round(c)) for c in cv2.mean(img)[:3])
    for (top, left, h, w), color in zip(holes, colors):
        out[top : top + h, left : left + w] = mean if fill == "mean" else color
    return out


class Cutout(Transform):
    """Erase rectangles (each side a fraction of the image side) so the head cannot rely on one part."""

    name = "cutout"
    _FILLS = ("mean", "random")

    def __init__(self, p: float = 0.25, holes: Sequence[int] = (1, 1), size: Sequence[float] = (0.1, 0.3),
                 fill: str = "mean") -> None:
        super().__init__(p)
        lo, hi = _pair(holes, "cutout.holes")
        self.holes = (int(lo), int(hi))
        self.size = _pair(size, "cutout.size")
        if fill not in self._FILLS:
            raise EdgetuneError(f"Augmentation 'cutout': fill must be one of {', '.join(self._FILLS)}: {fill!r}")
        if not 0 < self.size[1] <= 1 or self.holes[0] < 0:
            raise EdgetuneError("Augmentation 'cutout': size must lie in (0, 1] and holes be >= 0")
        self.fill = fill

    def draw(self, rng: np.random.Generator, height: int, width: int) -> dict:
        n = int(rng.integers(self.holes[0], self.holes[1] + 1))
        holes, colors = [], []
        for _ in range(n):
            h = max(1, round(height * rng.uniform(*self.size)))
            w = max(1, round(width * rng.uniform(*self.size)))
            holes.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
            colors.append(tuple(int(c) for c in rng.integers(0, 256, size=3)))
        return {"holes": holes, "fill": self.fill, "colors": colors}

    apply = staticmethod(cutout)


# Every Transform subclass must be listed here (a test checks): the name is the key in presets,
# overrides and config.json, and the order is the order Compose applies them.
TRANSFORMS: dict[str, type[Transform]] = {
    cls.name: cls
    for cls in (RandomResizedCrop, HorizontalFlip, VerticalFlip, Rotate, Scale,
                ColorJitter, GaussianNoise, Blur, Cutout)
}


# --------------------------------------------------------------------------------------- compose


class Compose:
    """Transforms in order; the output is always size x size uint8 RGB.

    Consecutive geometric transforms are fused into one affine matrix and resampled once. When there
    is no crop, or the crop is skipped this time, the view starts from eval_view.
    """

    def __init__(self, transforms: Sequence[Transform], size: int) -> None:
        self.transforms = list(transforms)
        self.size = int(size)
        crops = [i for i, t in enumerate(self.transforms) if isinstance(t, RandomResizedCrop)]
        if crops and crops != [0]:
            raise EdgetuneError("RandomResizedCrop must be the first transform in Compose (and appear once)")

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        transforms = self.transforms
        pending: np.ndarray | None = None  # fused input->output matrix not yet applied to `img`
        out_h, out_w = img.shape[:2]
        if transforms and isinstance(transforms[0], RandomResizedCrop):
            params = transforms[0].sample(rng, out_h, out_w)
            transforms = transforms[1:]
            if params is not None:
                pending, out_h, out_w = RandomResizedCrop.matrix({**params, "size": self.size}, out_h, out_w)
        if pending is None:
            img = eval_view(img, self.size)
            out_h = out_w = self.size
        for t in transforms:
            params = t.sample(rng, out_h, out_w)
            if params is None:
                continue
            if t.geometric:
                m, out_h, out_w = t.matrix(params, out_h, out_w)
                pending = m if pending is None else m @ pending
            else:
                img = _flush(img, pending, out_h, out_w)
                pending = None
                img = t.apply(img, **params)
        img = _flush(img, pending, out_h, out_w)
        return img if img.flags.c_contiguous else np.ascontiguousarray(img)

    def __repr__(self) -> str:
        return f"Compose(size={self.size}, transforms={self.transforms!r})"


def _flush(img: np.ndarray, m: np.ndarray | None, height: int, width: int) -> np.ndarray:
    if m is None:
        return img
    scale = math.sqrt(abs(np.linalg.det(m[:2, :2])))
    if scale < 0.5:
        # Bilinear sampling aliases when shrinking more than 2x: shrink with INTER_AREA first so
        # the warp only has to cover the last factor of <= 2.
        f = min(1.0, 2.0 * scale)
        pre_w, pre_h = max(1, round(img.shape[1] * f)), max(1, round(img.shape[0] * f))
        fx, fy = pre_w / img.shape[1], pre_h / img.shape[0]
        img = cv2.resize(img, (pre_w, pre_h), interpolation=cv2.INTER_AREA)
        pre = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]])
        m = m @ np.linalg.inv(pre)
    return _warp(img, m, height, width)


# ---------------------------------------------------------------------------------------- presets

_OFF = {"p": 0.0}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # eval_view only: no randomness at all.
    "none": {"crop": {"p": 0.0}, "hflip": _OFF, "vflip": _OFF, "rotate": _OFF, "scale": _OFF,
             "color": _OFF, "noise": _OFF, "blur": _OFF, "cutout": _OFF},
    "light": {
        "crop": {"p": 1.0, "scale": [0.6, 1.0], "ratio": [0.75, 4 / 3]},
        "hflip": {"p": 0.5}, "vflip": _OFF,
        "rotate": {"p": 0.3, "limit": 10.0},
        "scale": _OFF,
        "color": {"p": 0.5, "brightness": 0.15, "contrast": 0.15, "saturation": 0.15, "hue": 0.02},
        "noise": _OFF, "blur": _OFF, "cutout": _OFF,
    },
    # Frozen-backbone fine-tuning of natural photos: strong crops and colour carry most of the gain.
    "default": {
        "crop": {"p": 1.0, "scale": [0.35, 1.0], "ratio": [0.75, 4 / 3]},
        "hflip": {"p": 0.5}, "vflip": _OFF,
        "rotate": {"p": 0.5, "limit": 15.0},
        "scale": _OFF,  # the random crop already varies the object's size
        "color": {"p": 0.8, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
        "noise": {"p": 0.1, "sigma": [2.0, 8.0]},
        "blur": {"p": 0.1, "ksize": [3, 5]},
        "cutout": {"p": 0.25, "holes": [1, 1], "size": [0.1, 0.3], "fill": "mean"},
    },
    "strong": {
        "crop": {"p": 1.0, "scale": [0.25, 1.0], "ratio": [0.75, 4 / 3]},
        "hflip": {"p": 0.5}, "vflip": _OFF,
        "rotate": {"p": 0.7, "limit": 30.0},
        "scale": {"p": 0.5, "scale": [0.8, 1.25]},
        "color": {"p": 0.9, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1},
        "noise": {"p": 0.25, "sigma": [3.0, 12.0]},
        "blur": {"p": 0.2, "ksize": [3, 7]},
        "cutout": {"p": 0.5, "holes": [1, 3], "size": [0.1, 0.35], "fill": "random"},
    },
}


def _settings_of(cls: type[Transform]) -> list[str]:
    params = inspect.signature(cls.__init__).parameters
    # The output size of a crop comes from the model, not from the preset.
    return [n for n in params if n != "self" and not (cls.needs_size and n == "size")]


def _unknown(kind: str, name: str, valid: Sequence[str], where: str = "") -> EdgetuneError:
    return unknown_choice(kind, name, valid, where=where)


def augmentation_config(preset: str = "default", overrides: dict | None = None) -> dict:
    """The fully resolved settings (preset merged with overrides), JSON-serialisable for config.json.

    build_augmentation(cfg["preset"], size=..., overrides=cfg["transforms"]) rebuilds the same pipeline.
    """
    if preset not in PRESETS:
        raise _unknown("augmentation preset", preset, list(PRESETS))
    resolved: dict[str, dict[str, Any]] = {}
    for name, cls in TRANSFORMS.items():
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                    if k in _settings_of(cls)}
        resolved[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}
        resolved[name].update(copy.deepcopy(PRESETS[preset].get(name, _OFF)))
    for name, settings in (overrides or {}).items():
        if name not in TRANSFORMS:
            raise _unknown("augmentation", name, list(TRANSFORMS))
        if not isinstance(settings, dict):
            raise EdgetuneError(f"Augmentation override for '{name}' must be a dict of settings: {settings!r}")
        valid = _settings_of(TRANSFORMS[name])
        for key, value in settings.items():
            if key not in valid:
                raise _unknown("setting", key, valid, where=f" for augmentation '{name}'")
            resolved[name][key] = list(value) if isinstance(value, tuple) else value
    for name, settings in resolved.items():
        _instantiate(name, settings, size=224)  # validates values here, not at first use
    return {"preset": preset, "transforms": resolved}


def _instantiate(name: str, settings: dict[str, Any], *, size: int) -> Transform:
    cls = TRANSFORMS[name]
    extra = {"size": size} if cls.needs_size else {}
    try:
        return cls(**extra, **settings)
    except (TypeError, ValueError) as e:
        raise EdgetuneError(f"Invalid settings for augmentation '{name}' {settings}: {e}") from None


def build_augmentation(preset: str = "default", *, size: int, overrides: dict | None = None) -> Compose:
    """The training-view pipeline for `preset` with `overrides` merged in; size x size output."""
    cfg = augmentation_config(preset, overrides)["transforms"]
    transforms = []
    for name, cls in TRANSFORMS.items():
        settings = cfg[name]
        if settings["p"] <= 0.0:
            continue  # off: do not even draw from the rng
        transforms.append(_instantiate(name, settings, size=size))
    return Compose(transforms, size)


def training_view(img: np.ndarray, image: int, view: int, aug: Compose, *, seed: int, size: int) -> np.ndarray:
    """View `view` of training image number `image` as the training features see it: 0 is the
    eval view, the others `aug` drawn from (seed, image, view) alone, never from thread timing,
    so `adapt` can re-draw exactly the views a run was trained on."""
    if view == 0:
        return eval_view(img, size)
    return aug(img, np.random.default_rng([seed, image, view]))


def augment_grid(images: list[np.ndarray], aug: Compose, *, seed: int, cols: int = 8,
                 rows: int = 4) -> np.ndarray:
    """Preview mosaic: one row per image, eval_view in the first column, augmented views after."""
    if not images:
        raise EdgetuneError("No images to preview: the dataset is empty")
    rng = np.random.default_rng(seed)
    s = aug.size
    n_rows = min(rows, len(images))
    grid = np.zeros((n_rows * s, cols * s, 3), dtype=np.uint8)
    for r in range(n_rows):
        grid[r * s : (r + 1) * s, 0:s] = eval_view(images[r], s)
        for c in range(1, cols):
            grid[r * s : (r + 1) * s, c * s : (c + 1) * s] = aug(images[r], rng)
    return grid
