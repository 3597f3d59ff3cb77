"""A model of the camera that took some unlabelled images, fitted to them, to re-render labelled ones.

A robot's new camera changes the image by the steps of image formation, in the order they happen:
optics blur (a Gaussian point-spread function), exposure (gain and gamma of the tone curve), white
balance (the gains of two channels relative to the first), sensor noise (Gaussian, in grey levels),
compression (JPEG quality). `Camera` holds one setting of each and renders an eval view through them.

`fit_camera` finds the setting under which the run's own training images look, to the frozen
backbone, like the target images: the one that minimises the distance between the two sets' mean
features, each channel's difference in units of its standard error (so the sets need not show the
same things: 64 random caltech50 training images against 64 others give a distance of about 1,
a blur of sigma 3 px on one side about 3). The search is coordinate descent over a fixed grid per
step, from the identity, until the distance is down to chance or a round changes nothing; a fit
that explains less than MIN_EXPLAINED of the distance is taken as no change of camera.
`toolkit.adapt` then refits the run's head on its training images rendered by the fitted camera
beside the clean ones, so the head has seen the new camera with the labels it knows.

The tone curve and white balance lose nothing that a per-channel lookup table cannot give back
(short of clipping and 8-bit steps), so where the fit says they changed, `correction_lut` undoes
them on the new camera's frames before the backbone (a step of the preprocessing, recorded in the
run and every export) and the head is refitted on renderings passed through the same table: what
the head sees then differs from the training camera only by what no table undoes (blur, noise,
compression).

The grids are geometric and generic (not the camera-shift benchmark's settings); a camera outside
this family (motion blur, vignetting, a different lens) is only approximated by its nearest member.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

# Grids of each step, identity first. Geometric spacing (2^(k/4) for tone and colour, 2^(k/2) for
# blur and noise) so a relative change costs the same anywhere in the range.
GRIDS: dict[str, tuple[float, ...]] = {
    # The tone curve y = gain x^gamma, as the level of mid-grey (y(0.5) / 0.5) and gamma: darker
    # exposure moves the level alone, so the two are searched one at a time without trading off
    # (as gamma and gain do: a darker picture is either).
    "level": tuple(round(2 ** (k / 4), 3) for k in range(-16, 3)),  # 0.06 .. 1.41
    "gamma": tuple(round(2 ** (k / 4), 3) for k in range(-4, 7)),  # 0.5 .. 2.8
    "tint1": tuple(round(2 ** (k / 4), 3) for k in range(-5, 3)),  # channel 1 / channel 0: 0.42 .. 1.41
    "tint2": tuple(round(2 ** (k / 4), 3) for k in range(-5, 3)),
    "blur": (0.0,) + tuple(round(0.5 * 2 ** (k / 2), 3) for k in range(8)),  # sigma px: 0.5 .. 5.7
    "noise": (0.0,) + tuple(round(3 * 2 ** (k / 2), 2) for k in range(8)),  # sigma grey levels: 3 .. 34
    "jpeg": (100, 90, 70, 50, 35, 25, 18, 12, 8, 5),  # quality; 100 = not compressed
}
IDENTITY = {"blur": 0.0, "noise": 0.0, "jpeg": 100, "gamma": 1.0, "level": 1.0, "tint1": 1.0, "tint2": 1.0}
MAX_ROUNDS = 4  # rounds of coordinate descent at most: a bound on the cost (36-47 renderings per benchmark fit)
# The distance two samples of one camera have by chance: each channel's squared difference is in
# units of its own variance, so its expectation is 1 (measured between 64 and 64 training images of
# the same camera: 0.85-0.96). A setting that reaches it matches as well as can be told: the search
# stops there, and does not start when the training images are that close already (every unshifted
# benchmark target; every shifted one was above 1.0).
CHANCE_DISTANCE = 1.0
# A fitted camera replaces the identity only if it explains this share of the distance: on both
# visible sets, fits to another sample of the training camera itself lowered it by 0-3%, fits to a
# real change by 11% (mild low light, caltech50) to 86% (strong blur, ants/bees).
MIN_EXPLAINED = 0.1


@dataclass(frozen=True)
class Camera:
    blur: float = 0.0
    noise: float = 0.0
    jpeg: int = 100
    gamma: float = 1.0
    level: float = 1.0
    tint1: float = 1.0
    tint2: float = 1.0

    @property
    def is_identity(self) -> bool:
        return asdict(self) == IDENTITY

    @property
    def has_tone(self) -> bool:
        """Whether the tone curve or white balance differ from the identity."""
        return (self.gamma, self.level, self.tint1, self.tint2) != (1.0, 1.0, 1.0, 1.0)

    def without_tone(self) -> "Camera":
        return replace(self, gamma=1.0, level=1.0, tint1=1.0, tint2=1.0)

    def tone_only(self) -> "Camera":
        return replace(self, blur=0.0, noise=0.0, jpeg=100)

    def with_tone(self, tone: "Camera") -> "Camera":
        """This camera with the tone curve and white balance of `tone`."""
        return replace(self, gamma=tone.gamma, level=tone.level, tint1=tone.tint1, tint2=tone.tint2)

    def _gains(self) -> np.ndarray:
        gain = self.level * 0.5 ** (1.0 - self.gamma)
        return np.array([gain, gain * self.tint1, gain * self.tint2], np.float64)

    def correction_lut(self) -> np.ndarray:
        """(256, 3) uint8: per channel, the value a pixel of this camera had before its tone curve
        and white balance (`render`'s y = gain_c x^gamma inverted, clipped to 0..255)."""
        y = np.arange(256, dtype=np.float64)[:, None] / 255.0
        x = np.clip(y / self._gains(), 0.0, 1.0) ** (1.0 / self.gamma)
        return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)

    def describe(self) -> str:
        """The steps that differ from the identity, e.g. 'blur 2.83 px, jpeg q12'."""
        units = {"blur": " px", "noise": " grey levels", "jpeg": ""}
        parts = [f"{k} {'q' if k == 'jpeg' else ''}{v:g}{units.get(k, '')}" for k, v in asdict(self).items()
                 if v != IDENTITY[k]]
        return ", ".join(parts) or "unchanged"

    def render(self, view: np.ndarray, seed: int = 0) -> np.ndarray:
        """`view` (H, W, 3 uint8, as the backbone reads it) as this camera would have taken it."""
        import cv2

        img = view
        if self.blur > 0:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=self.blur)
        if self.has_tone:
            x = (img.astype(np.float32) / 255.0) ** self.gamma
            x *= self._gains().astype(np.float32)
            img = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)
        if self.noise > 0:
            noise = np.random.default_rng(seed).normal(0.0, self.noise, img.shape)
            img = np.clip(img + noise + 0.5, 0, 255).astype(np.uint8)
        if self.jpeg < 100:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, int(self.jpeg)])
            img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        return img


def mean_and_se2(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean of (N, D) features and its squared standard error."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), x.var(0, ddof=1) / len(x)


def distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Mean over channels of the squared mean difference in units of its standard error."""
    return float(np.mean((a[0] - b[0]) ** 2 / np.maximum(a[1] + b[1], 1e-12)))


@dataclass
class CameraFit:
    camera: Camera
    distance: float  # of the fitted camera's rendering to the target
    identity_distance: float  # of the training images as they are
    evaluations: int
    # Share of identity_distance that the tone and white-balance steps explain beyond the others
    # (the fitted camera without them, against with them).
    tone_explained: float = 0.0

    @property
    def corrects_tone(self) -> bool:
        """Undo the tone steps on the new camera's frames: only where they explain a real part of
        the change. A tone step the fit took up by chance (a slight tint beside a blur or noise, seen
        on both visible sets) would otherwise be 'undone' on frames that never had it."""
        return self.camera.has_tone and self.tone_explained >= MIN_EXPLAINED

    def to_json(self) -> dict:
        return {"fitted": self.camera.describe(), "settings": asdict(self.camera),
                "distance": round(self.distance, 3), "identity_distance": round(self.identity_distance, 3),
                "tone_explained": round(self.tone_explained, 3), "corrects_tone": self.corrects_tone,
                "evaluations": self.evaluations}


def fit_camera(features: Callable[[list[np.ndarray]], np.ndarray], source_views: list[np.ndarray],
               target_features: np.ndarray, progress: Callable[[int], None] | None = None) -> CameraFit:
    """The Camera under which `source_views` (the run's training images, eval views) look most like
    the target, by `features` (views -> (N, D) backbone features) against `target_features`."""
    target = mean_and_se2(target_features)
    seen: dict[Camera, float] = {}

    def cost(camera: Camera) -> float:
        if camera not in seen:
            views = source_views if camera.is_identity else [camera.render(v, seed=i) for i, v in enumerate(source_views)]
            seen[camera] = distance(mean_and_se2(features(views)), target)
            if progress:
                progress(len(seen))
        return seen[camera]

    best = Camera()
    identity = cost(best)
    if identity <= CHANCE_DISTANCE:  # as alike as two samples of one camera: nothing to fit
        return CameraFit(best, identity, identity, len(seen))
    enough = min(CHANCE_DISTANCE, (1 - MIN_EXPLAINED) * identity)
    # Each step alone from the identity, over every other grid value (a step can be flat near the
    # identity, as mild JPEG is, and a walk from there would stop at once). The steps are then descended
    # in the order of what each explains alone: a step taken first absorbs what it can mimic of the
    # others (a noisy target fitted with gamma first left the noise at a third of its sigma).
    alone = {step: min(grid[::2], key=lambda v, step=step: cost(replace(Camera(), **{step: v})))
             for step, grid in GRIDS.items()}
    order = sorted(GRIDS, key=lambda step: cost(replace(Camera(), **{step: alone[step]})))
    for _ in range(MAX_ROUNDS):
        start = best
        for step in order:
            if cost(best) <= enough:
                break
            tried = replace(best, **{step: alone[step]})
            best = _descend(tried if cost(tried) < cost(best) else best, step, GRIDS[step], cost)
        if best == start or cost(best) <= enough:
            break
    if cost(best) > (1 - MIN_EXPLAINED) * identity:
        best = Camera()  # no better than the camera the run was trained with, within chance
    tone = (cost(best.without_tone()) - cost(best)) / identity if best.has_tone else 0.0
    return CameraFit(best, cost(best), identity, len(seen), tone)


# Pixel quantiles the tone fit matches (per channel, pooled over all images of a side), and the
# range of grey levels it trusts: clipped and near-black pixels say nothing about the curve.
TONE_QUANTILES = np.linspace(0.02, 0.98, 49)
TONE_RANGE = (4 / 255, 250 / 255)


def fit_tone(source_views: list[np.ndarray], target_views: list[np.ndarray]) -> Camera:
    """The tone curve and white balance (y_c = gain_c x^gamma) that map the source views' pixel
    distribution onto the target's, per channel, by least squares on log quantiles (one gamma, three
    gains), unconstrained by the grids.

    `fit_camera` tells whether the tone changed, to the precision of mean features, and stops as
    soon as the distance is down to chance: often a level alone where the curve also bent. A table
    that undoes the tone needs the curve itself, and each side's pooled pixels (tens of thousands
    per image) pin it down far better, as long as the two sides show similar scenes on average."""
    def quantiles(views):
        px = np.concatenate([np.asarray(v).reshape(-1, 3) for v in views]).astype(np.float64)
        return np.quantile((px + 0.5) / 256.0, TONE_QUANTILES, axis=0)  # (Q, 3)

    s, t = quantiles(source_views), quantiles(target_views)
    lo, hi = TONE_RANGE
    ok = (s > lo) & (s < hi) & (t > lo) & (t < hi)
    rows, rhs = [], []
    for c in range(3):
        for q in np.flatnonzero(ok[:, c]):
            rows.append([np.log(s[q, c])] + [1.0 * (c == k) for k in range(3)])
            rhs.append(np.log(t[q, c]))
    if len(rows) < 8 or any(ok[:, c].sum() < 2 for c in range(3)):
        return Camera()  # too few usable quantiles (a nearly black or white target): no tone fit
    (gamma, *log_gain), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    gamma = float(np.clip(gamma, GRIDS["gamma"][0], GRIDS["gamma"][-1]))
    gain = np.exp(log_gain)
    return Camera(gamma=round(gamma, 3), level=round(float(gain[0] / 0.5 ** (1.0 - gamma)), 3),
                  tint1=round(float(gain[1] / gain[0]), 3), tint2=round(float(gain[2] / gain[0]), 3))


def _descend(camera: Camera, step: str, grid: tuple[float, ...], cost: Callable[[Camera], float]) -> Camera:
    """Walk `step` along its grid towards the cheaper neighbour while the cost falls: along one step
    the distance falls to one minimum and rises again, so this costs about two evaluations per step."""
    at = lambda j: replace(camera, **{step: grid[j]})  # noqa: E731
    i = grid.index(getattr(camera, step))
    for direction in (1, -1):
        j = i
        while 0 <= j + direction < len(grid) and cost(at(j + direction)) < cost(at(j)):
            j += direction
        if j != i:
            return at(j)
    return camera
