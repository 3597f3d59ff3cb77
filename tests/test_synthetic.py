"""Synthetic tabletop demo set: deterministic, right layout, every class renders and varies."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from toolkit.synthetic import DEMO_CLASSES, make_tabletop_dataset, render_object

SIZE = 96


def _read_all(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): cv2.imread(str(p), cv2.IMREAD_COLOR) for p in sorted(root.rglob("*.jpg"))}


def test_layout_and_counts(tmp_path: Path) -> None:
    out = make_tabletop_dataset(tmp_path / "demo", per_class=3, val_per_class=2, size=SIZE, seed=0)
    assert out == tmp_path / "demo"
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    for split, n in (("train", 3), ("val", 2)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(DEMO_CLASSES)
        for cls in DEMO_CLASSES:
            files = sorted(p.name for p in (out / split / cls).iterdir())
            assert files == [f"{i:04d}.jpg" for i in range(n)]
    img = cv2.imread(str(out / "train" / DEMO_CLASSES[0] / "0000.jpg"), cv2.IMREAD_COLOR)
    assert img is not None and img.shape == (SIZE, SIZE, 3)


def test_zero_val_makes_empty_class_folders(tmp_path: Path) -> None:
    out = make_tabletop_dataset(tmp_path / "d", per_class=1, val_per_class=0, size=64)
    assert all(len(list((out / "train" / c).iterdir())) == 1 for c in DEMO_CLASSES)
    assert all(not list((out / "val" / c).iterdir()) for c in DEMO_CLASSES)


def test_same_seed_same_pixels_and_different_seed_differs(tmp_path: Path) -> None:
    a = _read_all(make_tabletop_dataset(tmp_path / "a", per_class=2, val_per_class=1, size=SIZE, seed=7))
    b = _read_all(make_tabletop_dataset(tmp_path / "b", per_class=2, val_per_class=1, size=SIZE, seed=7))
    c = _read_all(make_tabletop_dataset(tmp_path / "c", per_class=2, val_per_class=1, size=SIZE, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert all(not np.array_equal(a[k], c[k]) for k in a)
    # train and val images are different scenes too
    assert not np.array_equal(a[f"train/{DEMO_CLASSES[0]}/0000.jpg"], a[f"val/{DEMO_CLASSES[0]}/0000.jpg"])


@pytest.mark.parametrize("cls", DEMO_CLASSES)
def test_render_object_shape_dtype_and_determinism(cls: str) -> None:
    img = render_object(cls, np.random.default_rng(3), SIZE)
    assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render_object(cls, np.random.default_rng(3), SIZE))
    assert img.std() > 5  # not a blank frame


@pytest.mark.parametrize("cls", DEMO_CLASSES)
def test_same_class_renders_vary(cls: str) -> None:
    rng = np.random.default_rng(11)
    imgs = [render_object(cls, rng, SIZE).astype(np.float32) for _ in range(4)]
    for i in range(len(imgs) - 1):
        assert (imgs[i] - imgs[i + 1]).std() > 15


def test_unknown_class_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        render_object("teapot", np.random.default_rng(0), SIZE)
