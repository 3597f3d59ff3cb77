"""The camera model `adapt --method camera` fits: each step renders what it claims, and the fit finds
a camera from what it does to features of other images, and no camera where nothing changed."""

import numpy as np
import pytest

from toolkit.camera import GRIDS, Camera, fit_camera


def _views(n, seed):
    """Textured colour images (smooth blobs + fine detail), different content per seed."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # each image its own level, contrast and amount of detail, as photos differ
        coarse = cv2.resize(rng.uniform(-1, 1, (6, 6, 3)).astype(np.float32), (64, 64), interpolation=cv2.INTER_CUBIC)
        fine = rng.normal(0, 1, (64, 64, 1)).astype(np.float32)
        img = rng.uniform(90, 160) + rng.uniform(20, 60) * coarse + rng.uniform(5, 25) * fine
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _features(views):
    """A cheap stand-in for the backbone: per channel, level, contrast and detail at three scales."""
    import cv2

    rows = []
    for v in views:
        x, row = v.astype(np.float32), []
        for c in range(3):
            ch = x[..., c]
            row += [ch.mean(), ch.std()]
            for _ in range(3):
                row.append(np.abs(cv2.Laplacian(ch, cv2.CV_32F)).mean())
                ch = cv2.pyrDown(ch)
        rows.append(row)
    return np.array(rows)


def test_each_step_renders_what_it_names():
    import cv2

    view = _views(1, 0)[0]
    assert np.array_equal(Camera().render(view), view) and Camera().is_identity
    detail = lambda im: np.abs(cv2.Laplacian(im.mean(2).astype(np.float32), cv2.CV_32F)).mean()  # noqa: E731
    assert detail(Camera(blur=2.0).render(view)) < 0.5 * detail(view)
    assert Camera(level=0.5).render(view).mean() < 0.6 * view.mean()
    tinted = Camera(tint2=0.5).render(view).astype(float).mean((0, 1))
    assert tinted[2] < 0.6 * view.astype(float).mean((0, 1))[2] and abs(tinted[0] - view[..., 0].mean()) < 1
    noisy = Camera(noise=12).render(view, seed=3)
    assert np.array_equal(noisy, Camera(noise=12).render(view, seed=3)), "noise comes from the seed alone"
    assert 9 < (noisy.astype(float) - view).std() < 14
    assert not np.array_equal(Camera(jpeg=8).render(view), view)
    assert Camera(blur=GRIDS["blur"][3], jpeg=12).describe() == f"blur {GRIDS['blur'][3]:g} px, jpeg q12"


@pytest.mark.parametrize("camera", [Camera(blur=GRIDS["blur"][4]), Camera(level=GRIDS["level"][11]),
                                    Camera(noise=GRIDS["noise"][5])])
def test_fit_finds_the_camera_from_other_images(camera):
    source, other = _views(48, 1), _views(48, 2)  # the target shows different images
    target = _features([camera.render(v, seed=100 + i) for i, v in enumerate(other)])
    fit = fit_camera(_features, source, target)
    assert fit.distance < 0.5 * fit.identity_distance
    step = next(k for k, v in vars(camera).items() if v != vars(Camera())[k])
    grid = GRIDS[step]
    # Within one grid step of the truth: neighbours render alike within sampling noise. (Other
    # steps may move a little with it: a blur also lowers contrast, which the tone curve can mimic.)
    assert abs(grid.index(getattr(fit.camera, step)) - grid.index(getattr(camera, step))) <= 1, fit.camera


def test_no_camera_is_fitted_where_the_camera_did_not_change():
    source, other = _views(48, 1), _views(48, 2)
    fit = fit_camera(_features, source, _features(other))
    assert fit.camera.is_identity and fit.to_json()["fitted"] == "unchanged"


def test_correction_table_undoes_the_tone_curve_and_white_balance():
    from toolkit.preprocess import apply_correction

    view = _views(1, 3)[0]
    assert np.array_equal(apply_correction(view, Camera().correction_lut()), view), "the identity's table changes nothing"
    dark = Camera(gamma=GRIDS["gamma"][6], level=GRIDS["level"][10], tint1=GRIDS["tint1"][3], tint2=GRIDS["tint2"][1])
    shot = dark.render(view)
    assert np.abs(shot.astype(float) - view).mean() > 30
    back = apply_correction(shot, dark.correction_lut()).astype(float)
    # 8-bit steps of the dark rendering are stretched back: a few grey levels, never a shift.
    assert np.abs(back - view).mean() < 3 and abs((back - view).mean()) < 1.5
    assert np.array_equal(apply_correction(np.stack([shot, shot]), dark.correction_lut())[1], back.astype(np.uint8))


@pytest.mark.parametrize("camera, corrects", [(Camera(level=GRIDS["level"][11]), True),
                                              (Camera(tint2=GRIDS["tint2"][2]), True),
                                              (Camera(blur=GRIDS["blur"][4]), False)])
def test_fit_corrects_the_tone_only_where_the_tone_changed(camera, corrects):
    source, other = _views(48, 1), _views(48, 2)
    target = _features([camera.render(v, seed=100 + i) for i, v in enumerate(other)])
    fit = fit_camera(_features, source, target)
    assert fit.corrects_tone == corrects, fit
    assert fit.to_json()["corrects_tone"] == corrects
