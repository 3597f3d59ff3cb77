"""Procedurally generated "tabletop objects" images, so `edgetune demo` can run with no user data.

Every scene is drawn with OpenCV primitives only: a table surface (plain, wood-like or gradient, with
texture noise), sometimes a wall above a horizon line, one object of the class (mug, screwdriver,
ball, box, bottle) at a random position, size (0.3-0.7 of the image), pose and colour, a soft
shadow, sometimes a small distractor or a partial occluder, then random lighting (brightness, colour
temperature, a light gradient or vignette) and camera effects (blur, sensor noise, JPEG when saved).

Object colours come from one shared palette, so a class can only be told by its shape. Output is a
pure function of the seed: each image has its own generator seeded from (seed, split, class, index),
so the same seed gives the same pixels and the same JPEG bytes.

    make_tabletop_dataset(out)          # out/train/<class>/0000.jpg ..., out/val/<class>/0000.jpg ...
    render_object("mug", rng, 256)      # one HxWx3 uint8 RGB scene
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

__all__ = ["DEMO_CLASSES", "make_tabletop_dataset", "render_object"]

DEMO_CLASSES = ("mug", "screwdriver", "ball", "box", "bottle")

JPEG_QUALITY = 90
_SHIFT = 4  # sub-pixel bits for cv2 drawing
_ONE = 1 << _SHIFT

# Shared object palette (RGB): every class draws from all of it, so colour alone never tells a class.
_PALETTE = np.array([
    (200, 40, 35), (35, 80, 190), (40, 150, 60), (230, 200, 40), (235, 120, 30), (235, 235, 230),
    (40, 40, 45), (140, 140, 145), (130, 85, 45), (120, 50, 150), (30, 150, 150), (220, 120, 160),
], dtype=np.float32)
_TABLE = np.array([
    (150, 105, 65), (185, 145, 100), (110, 75, 45), (200, 195, 185), (120, 120, 120), (70, 70, 75),
    (225, 220, 210), (60, 110, 80), (170, 160, 140),
], dtype=np.float32)
_WALL = np.array([(230, 228, 220), (200, 205, 210), (180, 170, 150), (150, 170, 190), (90, 90, 95)],
                 dtype=np.float32)
_METAL = np.array((185, 188, 195), dtype=np.float32)

Shade = Callable[[np.ndarray, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------- helpers
@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """A fixed 2x-size field of N(0, 1) noise; images take random crops of it (fast, deterministic)."""
    return np.random.default_rng(12345).standard_normal((3, 2 * size, 2 * size), dtype=np.float32)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """3 x size x size N(0, 1) noise (planar)."""
    bank = _noise_bank(size)
    oy, ox = (int(v) for v in rng.integers(0, size, 2))
    out = bank[:, oy:oy + size, ox:ox + size]
    return out[:, ::-1] if rng.random() < 0.5 else out


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish, size x size float32 (a small random grid, upsampled)."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)


def _pick_colour(rng: np.random.Generator, avoid: Optional[np.ndarray] = None) -> np.ndarray:
    for _ in range(6):
        c = _PALETTE[rng.integers(len(_PALETTE))] * rng.uniform(0.8, 1.15) + rng.normal(0, 12, 3)
        c = np.clip(c, 10, 250).astype(np.float32)
        if avoid is None or np.abs(c - avoid).sum() > 90:
            return c
    return c


def _ellipse(cx: float, cy: float, rx: float, ry: float, a0: float = 0.0, a1: float = 360.0,
             n: int = 40) -> np.ndarray:
    t = np.radians(np.linspace(a0, a1, n))
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _cylinder(axis: str = "x", half: float = 0.5, light: float = 0.4, spec: float = 0.35,
              center: float = 0.0) -> Shade:
    """Shading across a cylinder whose cross-section runs along local `axis` (a 3-D-ish look)."""

    def shade(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = np.clip(((u if axis == "x" else v) - center) / half, -1.0, 1.0)
        nz = np.sqrt(1.0 - t * t)
        diffuse = np.clip(0.75 * nz + light * t, 0.0, None)
        return 0.35 + 0.75 * diffuse + spec * np.exp(-((t - 0.55 * np.sign(light)) / 0.13) ** 2)

    return shade


def _flat(level: float, grad: float = 0.0, axis: str = "y") -> Shade:
    def shade(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return level + grad * (u if axis == "x" else v)

    return shade


class _Part:
    __slots__ = ("pts", "colour", "shade", "thick", "closed")

    def __init__(self, pts: np.ndarray, colour: np.ndarray, shade: Optional[Shade] = None,
                 thick: float = 0.0, closed: bool = True) -> None:
        self.pts, self.colour, self.shade, self.thick, self.closed = pts, colour, shade, thick, closed


class _Canvas:
    """Planar float RGB image (3 x H x W: per-channel maths is much faster than H x W x 3) plus a local->pixel similarity transform p = t + s * R(angle) q."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img
        self.size = img.shape[1]
        self.set_pose(0.0, 0.0, 1.0, 0.0)

    def set_pose(self, tx: float, ty: float, scale: float, angle_deg: float) -> None:
        a = np.radians(angle_deg)
        c, s = np.cos(a), np.sin(a)
        self.t = np.array([tx, ty], dtype=np.float64)
        self.scale = scale
        self.R = np.array([[c, -s], [s, c]]) * scale
        self.Rinv = np.array([[c, s], [-s, c]]) / scale

    def to_px(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.R.T + self.t

    def draw_mask(self, part: _Part, mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> None:
        px = self.to_px(part.pts) - np.array(origin, dtype=np.float64)
        ipts = np.round(px * _ONE).astype(np.int32).reshape(-1, 1, 2)
        if part.thick > 0:
            th = max(1, int(round(part.thick * self.scale)))
            cv2.polylines(mask, [ipts], part.closed, 255, th, cv2.LINE_AA, _SHIFT)
        else:
            cv2.fillPoly(mask, [ipts], 255, cv2.LINE_AA, _SHIFT)

    def paint(self, part: _Part) -> None:
        px = self.to_px(part.pts)
        pad = 2 + (part.thick * self.scale if part.thick > 0 else 0)
        x0 = max(0, int(np.floor(px[:, 0].min() - pad)))
        y0 = max(0, int(np.floor(px[:, 1].min() - pad)))
        x1 = min(self.size, int(np.ceil(px[:, 0].max() + pad)) + 1)
        y1 = min(self.size, int(np.ceil(px[:, 1].max() + pad)) + 1)
        if x1 <= x0 or y1 <= y0:
            return
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        self.draw_mask(part, mask, (x0, y0))
        alpha = mask.astype(np.float32) * (1.0 / 255.0)
        colour = part.colour
        if part.shade is not None:
            ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
            dx, dy = xs - np.float32(self.t[0]), ys - np.float32(self.t[1])
            u = self.Rinv[0, 0] * dx + self.Rinv[0, 1] * dy
            v = self.Rinv[1, 0] * dx + self.Rinv[1, 1] * dy
            top = np.clip(colour[:, None, None] * part.shade(u, v).astype(np.float32), 0, 255)
        else:
            top = colour[:, None, None]
        region = self.img[:, y0:y1, x0:x1]
        region += (top - region) * alpha


# ----------------------------------------------------------------------------------- the objects
# Each builder returns (parts, extent, base): parts in local units, the local half-extent used to
# scale the object to its target size, and the local point where it touches the table (or None when
# it lies flat and the shadow just falls under it).

def _mug(rng: np.random.Generator) -> tuple[list[_Part], float, Optional[np.ndarray], float]:
    col = _pick_colour(rng)
    w = rng.uniform(0.5, 0.7)
    h = rng.uniform(0.6, 0.85)
    e = w / 2 * rng.uniform(0.18, 0.38)  # view elevation: how open the rim ellipse is
    light = rng.choice([-0.45, 0.45])
    side = rng.choice([-1.0, 1.0])
    parts = []
    # Handle: a thick C on one side, drawn first so the body covers its ends.
    hy = rng.uniform(-0.1, 0.05) * h
    hr_x, hr_y = rng.uniform(0.16, 0.24), rng.uniform(0.2, 0.28) * h / 0.7
    arc = _ellipse(side * w / 2, hy, hr_x, hr_y, -90, 90, 24) if side > 0 else \
        _ellipse(side * w / 2, hy, hr_x, hr_y, 90, 270, 24)
    parts.append(_Part(arc, col * 0.85, None, thick=rng.uniform(0.05, 0.08), closed=False))
    body = np.concatenate([
        np.array([[-w / 2, -h / 2], [w / 2, -h / 2]]),
        _ellipse(0, h / 2, w / 2, e, 0, 180, 30),
    ])
    parts.append(_Part(body, col, _cylinder("x", w / 2, light)))
    if rng.random() < 0.4:  # a printed band or logo patch
        bc = _pick_colour(rng, col)
        y0 = rng.uniform(-0.15, 0.15) * h
        bh = rng.uniform(0.08, 0.2) * h
        band = np.concatenate([_ellipse(0, y0, w / 2, e, 0, 180, 20), _ellipse(0, y0 + bh, w / 2, e, 180, 0, 20)])
        parts.append(_Part(band, bc, _cylinder("x", w / 2, light)))
    parts.append(_Part(_ellipse(0, -h / 2, w / 2, e), col * 1.05, _flat(1.0)))
    rim = rng.uniform(0.03, 0.05)
    inner_col = col * 0.3 if rng.random() < 0.7 else np.array((70, 40, 20), np.float32)  # empty or coffee
    parts.append(_Part(_ellipse(0, -h / 2, w / 2 - rim, e - rim * e / (w / 2)), inner_col,
                       _flat(1.0, 1.2, "y")))
    extent = max(h / 2 + e, w / 2 + 2 * hr_x)
    return parts, extent, np.array([0.0, h / 2]), w / 2


def _bottle(rng: np.random.Generator) -> tuple[list[_Part], float, Optional[np.ndarray], float]:
    col = _pick_colour(rng)
    wb = rng.uniform(0.24, 0.36)
    wn = wb * rng.uniform(0.3, 0.45)
    L = 1.0
    cap_h = rng.uniform(0.06, 0.1)
    neck = rng.uniform(0.08, 0.16)
    shoulder = rng.uniform(0.1, 0.22)
    top = -L / 2
    y_cap, y_neck, y_sh = top + cap_h, top + cap_h + neck, top + cap_h + neck + shoulder
    light = rng.choice([-0.45, 0.45])
    e = wb / 2 * rng.uniform(0.15, 0.3)
    # Body + shoulder + neck outline (right side down, then left side up), rounded base.
    sh = np.linspace(0, 1, 8)
    right_sh = np.stack([wn / 2 + (wb / 2 - wn / 2) * np.sin(sh * np.pi / 2), y_neck + sh * shoulder], 1)
    outline = np.concatenate([
        np.array([[wn / 2, y_cap]]), right_sh,
        _ellipse(0, L / 2 - e, wb / 2, e, 0, 180, 20),
        (right_sh * [-1, 1])[::-1], np.array([[-wn / 2, y_cap]]),
    ])
    parts = [_Part(outline, col, _cylinder("x", wb / 2, light, spec=0.55))]
    if rng.random() < 0.6:
        lc = _pick_colour(rng, col)
        ly0 = y_sh + rng.uniform(0.05, 0.15)
        ly1 = min(L / 2 - e - 0.03, ly0 + rng.uniform(0.2, 0.4))
        label = np.array([[-wb / 2, ly0], [wb / 2, ly0], [wb / 2, ly1], [-wb / 2, ly1]])
        parts.append(_Part(label, lc, _cylinder("x", wb / 2, light, spec=0.1)))
    cc = _pick_colour(rng, col)
    cw = wn / 2 + 0.015
    cap = np.array([[-cw, top], [cw, top], [cw, y_cap], [-cw, y_cap]])
    parts.append(_Part(cap, cc, _cylinder("x", cw, light, spec=0.2)))
    return parts, L / 2, np.array([0.0, L / 2 - e]), wb / 2


def _screwdriver(rng: np.random.Generator) -> tuple[list[_Part], float, Optional[np.ndarray], float]:
    col = _pick_colour(rng)
    L = 1.0
    lh = rng.uniform(0.36, 0.48)
    wh = rng.uniform(0.1, 0.15)
    ws = rng.uniform(0.025, 0.04)
    light = rng.choice([-0.45, 0.45])
    top = -L / 2
    yh = top + lh
    # Handle: rounded end, slight waist, then tapering into the ferrule.
    ys = np.linspace(top, yh, 14)
    t = (ys - top) / lh
    half = wh / 2 * (0.8 + 0.2 * np.sin(np.clip(t * 6, 0, np.pi / 2)) - 0.1 * np.sin(t * np.pi) - 0.25 * t ** 6)
    cap = _ellipse(0, top + wh * 0.25, wh * 0.4, wh * 0.25, 180, 360, 12)
    handle = np.concatenate([cap, np.stack([half, ys], 1), np.stack([-half, ys], 1)[::-1]])
    parts = [_Part(handle, col, _cylinder("x", wh / 2, light, spec=0.4))]
    if rng.random() < 0.5:  # two-tone grip
        gc = _pick_colour(rng, col)
        g0, g1 = top + lh * 0.35, top + lh * 0.85
        gh = wh / 2 * 0.82
        parts.append(_Part(np.array([[-gh, g0], [gh, g0], [gh, g1], [-gh, g1]]), gc,
                           _cylinder("x", wh / 2, light, spec=0.2)))
    for gx in np.linspace(-0.5, 0.5, int(rng.integers(3, 6))) * wh * 0.5:  # grooves
        parts.append(_Part(np.array([[gx, top + lh * 0.12], [gx, top + lh * 0.9]]), col * 0.45,
                           None, thick=0.012, closed=False))
    fw = ws * 1.3
    ferrule = np.array([[-fw, yh - 0.01], [fw, yh - 0.01], [fw, yh + 0.05], [-fw, yh + 0.05]])
    parts.append(_Part(ferrule, _METAL * 0.9, _cylinder("x", fw, light, spec=0.5)))
    tip_y = L / 2
    if rng.random() < 0.5:  # flat head: widening blade
        shaft = np.array([[-ws / 2, yh + 0.05], [ws / 2, yh + 0.05], [ws / 2, tip_y - 0.07],
                          [ws * 0.85, tip_y], [-ws * 0.85, tip_y], [-ws / 2, tip_y - 0.07]])
    else:  # Phillips: pointed
        shaft = np.array([[-ws / 2, yh + 0.05], [ws / 2, yh + 0.05], [ws / 2, tip_y - 0.06],
                          [0.0, tip_y], [-ws / 2, tip_y - 0.06]])
    parts.append(_Part(shaft, _METAL, _cylinder("x", ws / 2, light, spec=0.7)))
    return parts, L / 2, None, wh / 2


def _ball(rng: np.random.Generator) -> tuple[list[_Part], float, Optional[np.ndarray], float]:
    col = _pick_colour(rng)
    lx, ly = rng.uniform(-0.6, 0.6), rng.uniform(-0.7, -0.2)
    lz = np.sqrt(max(0.05, 1 - lx * lx - ly * ly))
    spec = rng.uniform(0.3, 0.8)

    def sphere(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        x, y = u / 0.5, v / 0.5
        nz = np.sqrt(np.clip(1 - x * x - y * y, 0, 1))
        nl = np.clip(x * lx + y * ly + nz * lz, 0, None)
        hz = nl  # cheap Blinn-ish term
        return 0.25 + 0.85 * nl + spec * hz ** 24

    parts = [_Part(_ellipse(0, 0, 0.5, 0.5, n=64), col, sphere)]
    kind = rng.random()
    if kind < 0.3:  # tennis / baseball-like seam
        a = rng.uniform(0, 360)
        seam = _ellipse(0, 0, 0.48, rng.uniform(0.15, 0.3), 0, 360, 48)
        c, s = np.cos(np.radians(a)), np.sin(np.radians(a))
        seam = seam @ np.array([[c, s], [-s, c]])
        parts.append(_Part(seam, _pick_colour(rng, col) * 0.9, None, thick=0.025))
    elif kind < 0.55:  # beach-ball segments
        c2 = _pick_colour(rng, col)
        a0 = rng.uniform(0, 360)
        for k in range(3):
            seg = np.concatenate([[[0.0, 0.0]], _ellipse(0, 0, 0.5, 0.5, a0 + 120 * k, a0 + 120 * k + 60, 12)])
            parts.append(_Part(seg, c2, sphere))
    return parts, 0.5, np.array([0.0, 0.48]), 0.45


def _box(rng: np.random.Generator) -> tuple[list[_Part], float, Optional[np.ndarray], float]:
    col = _pick_colour(rng)
    w, h = rng.uniform(0.5, 0.8), rng.uniform(0.35, 0.7)
    side = rng.choice([-1.0, 1.0])
    dx, dy = side * rng.uniform(0.14, 0.3), -rng.uniform(0.12, 0.28)
    x0, y0 = -w / 2 - dx / 2, -h / 2 - dy / 2
    f = np.array([[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h]])  # front face TL TR BR BL
    d = np.array([dx, dy])
    top = np.array([f[0], f[1], f[1] + d, f[0] + d])
    sidef = np.array([f[1], f[1] + d, f[2] + d, f[2]]) if side > 0 else np.array([f[0], f[0] + d, f[3] + d, f[3]])
    lv = rng.permutation([1.05, 0.8, 0.6])
    parts = [
        _Part(f, col, _flat(lv[1], rng.uniform(-0.3, 0.3))),
        _Part(top, col, _flat(lv[0], rng.uniform(-0.2, 0.2), "x")),
        _Part(sidef, col, _flat(lv[2], rng.uniform(-0.3, 0.3))),
    ]
    if rng.random() < 0.35:  # packing tape across the top and down the front
        tc = _pick_colour(rng, col)
        tw = rng.uniform(0.04, 0.08)
        cx = x0 + w / 2
        tape = np.array([[cx - tw, y0], [cx + tw, y0], [cx + tw + dx, y0 + dy], [cx - tw + dx, y0 + dy]])
        parts.append(_Part(tape, tc, _flat(lv[0])))
        parts.append(_Part(np.array([[cx - tw, y0], [cx + tw, y0], [cx + tw, y0 + 0.3 * h], [cx - tw, y0 + 0.3 * h]]),
                           tc, _flat(lv[1])))
    elif rng.random() < 0.4:  # a label on the front
        lc = _pick_colour(rng, col)
        lw, lh = w * rng.uniform(0.3, 0.5), h * rng.uniform(0.2, 0.4)
        lx, ly = x0 + rng.uniform(0.1, 0.9 - lw / w) * w, y0 + rng.uniform(0.15, 0.8 - lh / h) * h
        parts.append(_Part(np.array([[lx, ly], [lx + lw, ly], [lx + lw, ly + lh], [lx, ly + lh]]), lc, _flat(lv[1])))
    edge = col * 0.4
    thick = rng.uniform(0.008, 0.018)
    if side > 0:  # silhouette back edges, then the front face and the inner top-side edge
        back, inner = np.array([f[0], f[0] + d, f[1] + d, f[2] + d, f[2]]), np.array([f[1], f[1] + d])
    else:
        back, inner = np.array([f[3], f[3] + d, f[0] + d, f[1] + d, f[1]]), np.array([f[0], f[0] + d])
    parts.append(_Part(back, edge, None, thick=thick, closed=False))
    parts.append(_Part(f.copy(), edge, None, thick=thick, closed=True))
    parts.append(_Part(inner, edge, None, thick=thick, closed=False))
    allp = np.concatenate([f, top, sidef])
    extent = max(float(np.linalg.norm(allp, axis=1).max()), 0.3)  # radius: fits at any tilt
    base = np.array([(f[2, 0] + f[3, 0]) / 2 + dx / 2, f[2, 1] + dy / 2])
    return parts, extent, base, w / 2 + abs(dx) / 2


_BUILDERS = {"mug": _mug, "bottle": _bottle, "screwdriver": _screwdriver, "ball": _ball, "box": _box}


# ------------------------------------------------------------------------------------- the scene
def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    table = (_TABLE[rng.integers(len(_TABLE))] * rng.uniform(0.85, 1.15) + rng.normal(0, 10, 3)).astype(np.float32)
    ys = np.linspace(0, 1, size, dtype=np.float32)
    kind = rng.integers(3)
    if kind == 0:  # plain with blotchy texture
        img = table[:, None, None] + _smooth_field(rng, size, 6) * np.float32(rng.uniform(3, 12))
    elif kind == 1:  # wood grain: warped stripes
        warp = _smooth_field(rng, size, 5) * rng.uniform(3, 10)
        freq = np.float32(rng.uniform(0.08, 0.3))
        coord = ys[:, None] * size if rng.random() < 0.5 else ys[None, :] * size
        grain = np.sin((coord + warp) * freq) + np.float32(0.5) * np.sin((coord + np.float32(1.7) * warp) * (freq * 2.3))
        grain *= np.float32(rng.uniform(6, 18))
        img = table[:, None, None] + grain * np.array([1.0, 0.8, 0.6], np.float32)[:, None, None]
    else:  # gradient
        other = (table * rng.uniform(0.7, 1.3) + rng.normal(0, 15, 3)).astype(np.float32)
        a = np.float32(rng.uniform(0, 2 * np.pi))
        g = (np.cos(a) * ys[None, :] + np.sin(a) * ys[:, None])
        g = (g - g.min()) / max(float(g.max() - g.min()), 1e-6)
        img = table[:, None, None] + g.astype(np.float32) * (other - table)[:, None, None]
    img = np.ascontiguousarray(img, dtype=np.float32)
    img += _noise(rng, size) * np.float32(rng.uniform(1, 5))
    horizon = 0
    if rng.random() < 0.45:  # wall above a horizon line
        horizon = int(rng.uniform(0.12, 0.35) * size)
        wall = _WALL[rng.integers(len(_WALL))] * rng.uniform(0.8, 1.1) + rng.normal(0, 8, 3)
        img[:, :horizon] = wall.astype(np.float32)[:, None, None] + (ys[:horizon, None] * size - horizon) * 0.15
        img[:, max(0, horizon - 1):horizon + 1] *= 0.75
    return img, horizon


def _shadow(canvas: _Canvas, parts: list[_Part], base: Optional[np.ndarray], foot: float,
            rng: np.random.Generator, light_angle: float) -> None:
    size = canvas.size
    small = max(32, size // 4)
    k = small / size
    mask = np.zeros((small, small), np.uint8)
    saved_t, saved_R, saved_scale = canvas.t.copy(), canvas.R.copy(), canvas.scale
    off = rng.uniform(0.02, 0.06) * size
    canvas.t = (canvas.t + off * np.array([np.cos(light_angle), np.sin(light_angle)])) * k
    canvas.R = canvas.R * k
    canvas.scale = canvas.scale * k
    for p in parts:
        canvas.draw_mask(p, mask)
    if base is not None:  # contact shadow ellipse where the object stands
        cx, cy = canvas.to_px(base[None])[0]
        r = max(1.0, foot * canvas.scale * 1.1)
        cv2.ellipse(mask, (int(cx * _ONE), int(cy * _ONE)), (int(r * _ONE), int(r * 0.3 * _ONE)),
                    0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
    canvas.t, canvas.R, canvas.scale = saved_t, saved_R, saved_scale
    mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(1.0, 3.0))
    shade = cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    canvas.img *= 1.0 - shade * np.float32(rng.uniform(0.35, 0.6) / 255.0)


def _random_shape(canvas: _Canvas, rng: np.random.Generator, cx: float, cy: float, r: float) -> None:
    col = _pick_colour(rng)
    canvas.set_pose(cx, cy, r, rng.uniform(0, 360))
    kind = rng.integers(4)
    if kind == 0:
        pts = _ellipse(0, 0, 1, rng.uniform(0.4, 1.0), n=24)
    elif kind == 1:
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * [1, rng.uniform(0.3, 1)]
    elif kind == 2:
        pts = np.array([[0, -1], [0.9, 0.7], [-0.9, 0.7]])
    else:
        pts = np.array([[-1.0, 0], [1.0, 0]])
        canvas.paint(_Part(pts, col, None, thick=rng.uniform(0.15, 0.3), closed=False))
        return
    canvas.paint(_Part(pts, col, _flat(rng.uniform(0.7, 1.1), rng.uniform(-0.3, 0.3))))


def render_object(cls: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """One scene with one object of class `cls`: HxWx3 uint8 RGB (H = W = `size`)."""
    if cls not in _BUILDERS:
        raise ValueError(f"unknown class {cls!r}; expected one of {', '.join(DEMO_CLASSES)}")
    img, horizon = _background(rng, size)
    canvas = _Canvas(img)
    light_angle = rng.uniform(0, 2 * np.pi)

    # A distractor behind/beside the object, placed before it so the object may cover it.
    if rng.random() < 0.35:
        _random_shape(canvas, rng, rng.uniform(0.1, 0.9) * size, rng.uniform(max(0.1, horizon / size + 0.05), 0.92)
                      * size, rng.uniform(0.03, 0.07) * size)

    parts, extent, base, foot = _BUILDERS[cls](rng)
    target = rng.uniform(0.3, 0.7) * size  # the object's largest dimension, in pixels
    scale = target / (2 * extent)
    upright = cls in ("mug", "box", "ball") or (cls == "bottle" and rng.random() < 0.6)
    if cls == "ball":
        angle = 0.0
    elif upright:
        angle = rng.normal(0, 7 if cls != "box" else 10)
    else:
        angle = rng.uniform(0, 360)
        base = None
    margin = target / 2 + 2
    lo_y = max(margin, horizon + target * 0.25) if upright else margin
    tx = rng.uniform(margin, size - margin)
    ty = rng.uniform(min(lo_y, size - margin), size - margin)
    canvas.set_pose(tx, ty, scale, angle)
    _shadow(canvas, parts, base, foot, rng, light_angle)
    for p in parts:
        canvas.paint(p)

    if rng.random() < 0.2:  # partial occluder over an edge of the object
        a = rng.uniform(0, 2 * np.pi)
        d = target * rng.uniform(0.45, 0.6)
        _random_shape(canvas, rng, tx + d * np.cos(a), ty + d * np.sin(a), target * rng.uniform(0.1, 0.18))

    # Lighting: brightness, colour temperature, a soft gradient or vignette (computed small, upsampled).
    g = 24
    yy, xx = np.mgrid[0:g, 0:g].astype(np.float32) / (g - 1) - 0.5
    field = 1.0 + rng.uniform(0.0, 0.45) * (np.cos(light_angle) * xx + np.sin(light_angle) * yy)
    if rng.random() < 0.5:
        field = field * (1.0 - rng.uniform(0.1, 0.5) * (xx * xx + yy * yy) * 2)
    field = cv2.resize(field.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    temp = rng.uniform(-1, 1)
    gain = np.float32(rng.uniform(0.7, 1.2)) * np.array([1 + 0.08 * temp, 1.0, 1 - 0.1 * temp], np.float32)
    img = canvas.img
    img *= field * gain[:, None, None]

    # Camera: slight blur, sensor noise.
    if rng.random() < 0.6:
        sigma = rng.uniform(0.4, 1.2)
        for c in range(3):
            img[c] = cv2.GaussianBlur(img[c], (0, 0), sigma)
    img += _noise(rng, size) * np.float32(rng.uniform(1.5, 7.0))
    np.clip(img, 0, 255, out=img)
    return cv2.merge([img[0].astype(np.uint8), img[1].astype(np.uint8), img[2].astype(np.uint8)])


def _image_rng(seed: int, split: int, class_index: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, split, class_index, index]))


def make_tabletop_dataset(out: Path, *, per_class: int = 40, val_per_class: int = 15, size: int = 256,
                          seed: int = 0) -> Path:
    """Write out/train/<class>/NNNN.jpg (`per_class` each) and out/val/<class>/NNNN.jpg; return `out`."""
    out = Path(out)
    if per_class < 0 or val_per_class < 0:
        raise ValueError("per_class and val_per_class must be >= 0")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    for split_index, (split, n) in enumerate((("train", per_class), ("val", val_per_class))):
        for ci, cls in enumerate(DEMO_CLASSES):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rgb = render_object(cls, _image_rng(seed, split_index, ci, i), size)
                ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
                if not ok:
                    raise RuntimeError(f"JPEG encoding failed for {folder / f'{i:04d}.jpg'}")
                (folder / f"{i:04d}.jpg").write_bytes(buf.tobytes())
    return out
