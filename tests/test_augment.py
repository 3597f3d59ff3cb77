"""Augmentation: every registered transform obeys the pure-function contract; presets build."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

from toolkit import augment
from toolkit.augment import (
    PRESETS,
    TRANSFORMS,
    Compose,
    RandomResizedCrop,
    augment_grid,
    augmentation_config,
    build_augmentation,
    eval_view,
)
from toolkit.errors import EdgetuneError

CROP = 32


def _image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Smooth content plus texture so every transform visibly changes something.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w, 1)], axis=-1)
    return np.clip(base + rng.integers(-20, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _make(name: str, **settings) -> augment.Transform:
    cls = TRANSFORMS[name]
    extra = {"size": CROP} if cls.needs_size else {}
    return cls(**extra, p=1.0, **settings)


def _run(t: augment.Transform, img: np.ndarray, seed: int) -> np.ndarray:
    params = t.sample(np.random.default_rng(seed), *img.shape[:2])
    assert params is not None
    return t.apply(img, **params)


def test_every_transform_class_is_registered():
    defined = {
        cls for _, cls in inspect.getmembers(augment, inspect.isclass)
        if issubclass(cls, augment.Transform) and cls is not augment.Transform
    }
    assert defined == set(TRANSFORMS.values())
    assert all(name == cls.name for name, cls in TRANSFORMS.items())
    # Every registered transform has settings in every preset, so overrides can switch it on.
    for preset in PRESETS:
        assert set(augmentation_config(preset)["transforms"]) == set(TRANSFORMS)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_is_pure_and_keeps_dtype_and_shape(name):
    img = _image()
    before = img.copy()
    out = _run(_make(name), img, seed=3)
    np.testing.assert_array_equal(img, before)
    assert out is not img and not np.shares_memory(out, img)
    assert out.dtype == np.uint8
    expected = (CROP, CROP, 3) if TRANSFORMS[name].needs_size else img.shape
    assert out.shape == expected
    assert not np.array_equal(out, before) or out.shape != before.shape


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_same_seed_same_output(name):
    img = _image()
    t = _make(name)
    np.testing.assert_array_equal(_run(t, img, seed=7), _run(t, img, seed=7))
    np.testing.assert_array_equal(t(img, np.random.default_rng(7)), t(img, np.random.default_rng(7)))


@pytest.mark.parametrize("name", [n for n, c in TRANSFORMS.items() if c.randomised])
def test_different_seeds_differ(name):
    img = _image()
    t = _make(name)
    outs = [_run(t, img, seed=s) for s in range(6)]
    assert any(not np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_p_zero_skips(name):
    cls = TRANSFORMS[name]
    t = cls(**({"size": CROP} if cls.needs_size else {}), p=0.0)
    assert t.sample(np.random.default_rng(0), 48, 64) is None


@pytest.mark.parametrize("name", [n for n, c in TRANSFORMS.items() if c.geometric])
def test_geometric_matrix_matches_apply(name):
    # Compose fuses geometric transforms through matrix(); it must agree with apply().
    img = _image(64, 80)
    t = _make(name)
    params = t.sample(np.random.default_rng(1), *img.shape[:2])
    direct = t.apply(img, **params).astype(np.int16)
    m, h, w = t.matrix(params, *img.shape[:2])
    fused = augment._warp(img, m, h, w).astype(np.int16)
    inner = (slice(h // 4, 3 * h // 4), slice(w // 4, 3 * w // 4))  # borders differ by design
    assert np.abs(direct[inner] - fused[inner]).mean() < 3.0


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (10, 7), (300, 400)])
def test_presets_output_size(preset, shape):
    aug = build_augmentation(preset, size=CROP)
    img = _image(*shape)
    before = img.copy()
    rng = np.random.default_rng(0)
    for _ in range(5):
        out = aug(img, rng)
        assert out.shape == (CROP, CROP, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(img, before)


def test_none_preset_is_eval_view():
    img = _image(50, 90)
    aug = build_augmentation("none", size=CROP)
    assert aug.transforms == []
    np.testing.assert_array_equal(aug(img, np.random.default_rng(5)), eval_view(img, CROP))


def test_compose_is_seeded():
    aug = build_augmentation("strong", size=CROP)
    img = _image()
    a = [aug(img, np.random.default_rng(11)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.array_equal(a[0], aug(img, np.random.default_rng(12)))


def test_crop_must_come_first():
    with pytest.raises(EdgetuneError, match="first"):
        Compose([TRANSFORMS["hflip"](), RandomResizedCrop(size=CROP)], CROP)


def test_config_is_json_and_round_trips():
    cfg = augmentation_config("default", {"rotate": {"limit": 10}, "cutout": {"p": 0}})
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg["transforms"]["rotate"]["limit"] == 10
    assert cfg["transforms"]["rotate"]["p"] == PRESETS["default"]["rotate"]["p"]
    rebuilt = build_augmentation(cfg["preset"], size=CROP, overrides=cfg["transforms"])
    assert "cutout" not in [t.name for t in rebuilt.transforms]
    assert augmentation_config("default", cfg["transforms"]) == cfg


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda: build_augmentation("defualt", size=CROP), "Did you mean 'default'"),
        (lambda: build_augmentation(size=CROP, overrides={"rotat": {"limit": 5}}), "Did you mean 'rotate'"),
        (lambda: build_augmentation(size=CROP, overrides={"rotate": {"limt": 5}}), "Did you mean 'limit'"),
        (lambda: build_augmentation(size=CROP, overrides={"rotate": {"p": 2}}), "between 0 and 1"),
        (lambda: build_augmentation(size=CROP, overrides={"cutout": {"fill": "zero"}}), "mean, random"),
        (lambda: build_augmentation(size=CROP, overrides={"blur": {"ksize": [4, 4]}}), "odd"),
    ],
)
def test_bad_settings_raise_helpful_errors(call, needle):
    with pytest.raises(EdgetuneError, match=needle):
        call()


def test_unknown_names_list_available():
    with pytest.raises(EdgetuneError) as e:
        build_augmentation(size=CROP, overrides={"warp": {}})
    assert all(name in str(e.value) for name in TRANSFORMS)


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (5, 3), (1, 1), (500, 240), (37, 37)])
def test_eval_view_deterministic_and_sized(shape):
    img = _image(*shape)
    before = img.copy()
    a, b = eval_view(img, CROP), eval_view(img, CROP)
    assert a.shape == (CROP, CROP, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, before)


def test_eval_view_center_crops_after_resizing_shorter_side():
    size = 224
    img = np.zeros((256, 400, 3), np.uint8)  # shorter side already round(224 / 0.875) = 256
    img[:, 200 - 112 : 200 + 112] = 255
    out = eval_view(img, size)
    assert out.min() == 255  # exactly the central 224 columns


def test_augment_grid_shape():
    aug = build_augmentation("default", size=CROP)
    grid = augment_grid([_image(), _image(64, 48)], aug, seed=0, cols=5, rows=4)
    assert grid.shape == (2 * CROP, 5 * CROP, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[:CROP, :CROP], eval_view(_image(), CROP))
    np.testing.assert_array_equal(grid, augment_grid([_image(), _image(64, 48)], aug, seed=0, cols=5, rows=4))
    with pytest.raises(EdgetuneError):
        augment_grid([], aug, seed=0)
