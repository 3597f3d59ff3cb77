"""Datasets: layout discovery, splits, CSVs, robust decoding of odd and broken files, balance."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from toolkit import images
from toolkit.data import (Dataset, ImageStream, Sample, balanced_indices, check_images, class_weights, decode_images,
                          discover, load_eval_set)
from toolkit.errors import DataError
from toolkit.images import ImageReadError, read_image



def _jpeg_bytes(h: int = 40, w: int = 50) -> bytes:
    img = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _write(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


# ------------------------------------------------------------------------------------ read_image


def test_reads_jpeg_as_rgb(tmp_path):
    bgr = np.zeros((16, 20, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    cv2.imwrite(str(tmp_path / "red.jpg"), bgr)
    for name in ("red.png", "red.jpg"):
        img = read_image(tmp_path / name)
        assert img.shape == (16, 20, 3) and img.dtype == np.uint8
        assert img[..., 0].mean() > 240 and img[..., 2].mean() < 15


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "zero-byte"),
        (b"this is not a picture\n", "text file"),
        (b"<!DOCTYPE html><html>403 Forbidden</html>", "HTML"),
        (b"\x00\x13\x99\xfe" * 40, "cannot decode"),
        (_jpeg_bytes()[:-400], "truncated JPEG"),
    ],
)
def test_unreadable_files_raise_with_reason(tmp_path, payload, reason):
    path = _write(tmp_path / "bad.jpg", payload)
    with pytest.raises(ImageReadError, match=reason) as e:
        read_image(path)
    assert e.value.path == path and reason in e.value.reason
    assert isinstance(e.value, DataError)


def test_truncated_png(tmp_path):
    png = cv2.imencode(".png", np.full((30, 30, 3), 90, np.uint8))[1].tobytes()
    with pytest.raises(ImageReadError, match="truncated PNG"):
        read_image(_write(tmp_path / "cut.png", png[: len(png) // 2]))


def test_jpeg_with_trailing_padding_is_fine(tmp_path):
    img = read_image(_write(tmp_path / "pad.jpg", _jpeg_bytes() + b"\x00" * 64 + b"vendor trailer"))
    assert img.shape == (40, 50, 3)


def test_unicode_path(tmp_path):
    path = _write(tmp_path / "ñandú 蜂" / "abeja.jpg", _jpeg_bytes())
    assert read_image(path).shape == (40, 50, 3)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    img = np.zeros((4, 4, 3), np.uint16)
    img[0, 0] = (65535, 32768, 256)
    cv2.imwrite(str(tmp_path / "deep.png"), img)
    out = read_image(tmp_path / "deep.png")
    assert out.dtype == np.uint8
    assert tuple(out[0, 0]) == (1, 128, 255)  # RGB order of the BGR values >> 8
    grey = np.full((3, 5), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey)
    assert read_image(tmp_path / "grey16.png").min() == 255


def test_grayscale_png_becomes_rgb(tmp_path):
    cv2.imwrite(str(tmp_path / "g.png"), np.full((6, 7), 77, np.uint8))
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 7, 3) and (out == 77).all()


def test_rgba_png_composited_on_white(tmp_path):
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0] = 255  # blue
    bgra[:2, ..., 3] = 255  # top half opaque, bottom half transparent
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 4, 3)
    assert tuple(out[0, 0]) == (0, 0, 255)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_float_tiff_is_scaled(tmp_path):
    if not cv2.imwrite(str(tmp_path / "f.tiff"), np.full((4, 4, 3), 0.5, np.float32)):
        pytest.skip("this OpenCV build cannot write float TIFF")
    assert (read_image(tmp_path / "f.tiff") == 128).all()


@pytest.mark.parametrize("ext", [".bmp", ".webp", ".tif"])
def test_other_formats(tmp_path, ext):
    bgr = np.zeros((8, 9, 3), np.uint8)
    bgr[..., 1] = 200
    if not cv2.imwrite(str(tmp_path / f"x{ext}"), bgr, [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == ".webp" else []):
        pytest.skip(f"this OpenCV build cannot write {ext}")
    out = read_image(tmp_path / f"x{ext}")
    assert out.shape == (8, 9, 3) and abs(int(out[..., 1].mean()) - 200) <= 3


def test_cmyk_jpeg(tmp_path):
    pil = pytest.importorskip("PIL.Image", reason="Pillow writes the CMYK JPEG (test-only dependency)")
    pil.new("CMYK", (12, 10), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    out = read_image(tmp_path / "cmyk.jpg")
    assert out.shape == (10, 12, 3)
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 40 and b < 40


def _gif(tmp_path: Path) -> Path:
    pil = pytest.importorskip("PIL.Image", reason="Pillow writes the GIF (test-only dependency)")
    pil.new("RGB", (10, 8), (0, 0, 255)).save(tmp_path / "blue.gif")
    return tmp_path / "blue.gif"


def test_gif_decodes(tmp_path):
    out = read_image(_gif(tmp_path))
    assert out.shape == (8, 10, 3) and out[..., 2].min() > 200 and out[..., 0].max() < 40


def test_gif_fallback_when_imdecode_lacks_gif(tmp_path, monkeypatch):
    path = _gif(tmp_path)
    real = cv2.imdecode
    monkeypatch.setattr(images.cv2, "imdecode", lambda buf, flags: None if bytes(buf[:3]) == b"GIF" else real(buf, flags))
    assert read_image(path).shape == (8, 10, 3)


def test_large_jpeg_decodes_at_full_size(tmp_path):
    # No reduced-resolution decode: the pixels must not depend on who asks for the image.
    path = _write(tmp_path / "big.jpg", _jpeg_bytes(400, 640))
    assert read_image(path).shape[:2] == (400, 640)


# --------------------------------------------------------------------------------- decode_images


def test_decode_images_skips_bad_files_with_one_warning(tmp_path, make_image_folder, caplog):
    root = make_image_folder(tmp_path, n=4, size=(120, 90))
    _write(root / "cats" / "empty.jpg", b"")
    _write(root / "dogs" / "notes.jpg", b"shopping list")
    splits = discover(root)
    ds = Dataset(splits.train.samples + splits.val.samples, splits.train.classes, root)
    assert len(ds) == 10
    seen = []
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        images, clean, skipped = decode_images(ds, min_side=32, progress=seen.append)
    assert len(images) == len(clean) == len(ds) - 2
    assert {s.path.name for s in skipped} == {"empty.jpg", "notes.jpg"}
    assert seen == list(range(1, len(ds) + 1))
    assert all(min(i.shape[:2]) == 32 and i.dtype == np.uint8 for i in images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"Skipped 2 of {len(ds)} images" in warnings[0]
    assert "data/cats/empty.jpg (zero-byte file)" in warnings[0] and "notes.jpg" in warnings[0]


def test_decode_images_never_upscales(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=2, size=(20, 30))
    images, _, _ = decode_images(discover(root).train, min_side=256)
    assert all(i.shape == (20, 30, 3) for i in images)


def test_decode_images_errors_when_a_class_is_emptied(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=2)
    ds = discover(root).train
    broken = Dataset([Sample(_write(tmp_path / "x" / "a.jpg", b""), 1)] + [s for s in ds.samples if s.label == 0],
                     ds.classes, root)
    with pytest.raises(DataError, match="dogs"):
        decode_images(broken)


def test_check_images_finds_what_decoding_refuses_and_keeps_no_pixels(tmp_path, make_image_folder, caplog):
    root = make_image_folder(tmp_path, n=4, size=(120, 90))
    _write(root / "cats" / "empty.jpg", b"")
    _write(root / "dogs" / "notes.jpg", b"shopping list")
    _write(root / "dogs" / "cut.jpg", _jpeg_bytes(64, 64)[:-300])
    splits = discover(root)
    ds = Dataset(splits.train.samples + splits.val.samples, splits.train.classes, root)
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        clean, skipped = check_images(ds)
    _, decoded, refused = decode_images(ds)
    assert clean.samples == decoded.samples
    assert [(s.path, s.reason) for s in skipped] == [(s.path, s.reason) for s in refused]
    assert {s.path.name for s in skipped} == {"empty.jpg", "notes.jpg", "cut.jpg"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("Skipped 3 of" in w for w in warnings)  # check, then decode


def test_checking_a_set_keeps_a_bounded_few_files_in_flight(tmp_path, make_image_folder, monkeypatch):
    # A set of any size is checked with at most SCAN_WINDOW files per worker submitted ahead of
    # the results read back (one future per file of 50,000 held 75 MB), in file order, with
    # progress counting files in order and bad files still skipped.
    import toolkit.data as data

    class Counted(list):  # counts the samples taken for submission
        taken = 0

        def __iter__(self):
            for sample in super().__iter__():
                self.taken += 1
                yield sample

    root = make_image_folder(tmp_path, n=12, size=(40, 30))
    _write(root / "dogs" / "notes.jpg", b"shopping list")
    found = discover(root, val_fraction=0.1).train
    ds = Dataset(Counted(found.samples), found.classes, root)
    monkeypatch.setattr(data, "SCAN_WINDOW", 2)
    done, ahead = [], []

    def progress(n):
        done.append(n)
        ahead.append(ds.samples.taken - n)

    clean, skipped = data._scan(ds, data.check_image, 2, progress)[1:]
    assert done == list(range(1, len(ds) + 1))
    assert 0 < max(ahead) <= 2 * 2
    assert [s.path.name for s in skipped] == ["notes.jpg"]
    assert clean.samples == [s for s in found.samples if s.path.name != "notes.jpg"]


def test_image_stream_keeps_a_bounded_few_and_decodes_each_once(tmp_path, make_image_folder, monkeypatch):
    import threading
    import time

    from toolkit import data

    root = make_image_folder(tmp_path, n=10, size=(60, 80))
    ds = discover(root).train
    reference, _, _ = decode_images(ds, min_side=32)
    stream = ImageStream(ds, min_side=32, capacity=2)
    views = [stream.get(k // 3) for k in range(3 * len(ds))]  # 3 consecutive views per image
    for k, img in enumerate(views):
        np.testing.assert_array_equal(img, reference[k // 3])
    assert stream.decodes == len(ds) and stream.peak == 2 < len(ds)

    real_load, loads = data._load, []

    def slow_load(path, min_side):
        loads.append(path)
        time.sleep(0.05)  # the other threads ask while this decode is still running
        return real_load(path, min_side)

    monkeypatch.setattr(data, "_load", slow_load)
    stream, got = ImageStream(ds, min_side=32, capacity=1), []
    threads = [threading.Thread(target=lambda: got.append(stream.get(0))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(got) == 4 and all(img is got[0] for img in got)


def test_image_stream_reports_a_file_that_broke_after_the_check(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=3)
    ds = discover(root).train
    ds.samples[1].path.write_bytes(b"overwritten")
    stream = ImageStream(ds, min_side=None)
    assert stream.get(0) is not None and stream.get(1) is None
    assert stream.failed == {1: "not an image (text file)"}


# ------------------------------------------------------------------------------------- discovery


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        discover(tmp_path / "nope")


def test_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="No images found"):
        discover(tmp_path / "data")


def test_loose_images_without_class_folders(tmp_path):
    _write(tmp_path / "data" / "a.jpg", _jpeg_bytes())
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "data")


def test_single_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, classes=["ants"])
    with pytest.raises(DataError, match=r"needs at least 2 classes, found 1 \('ants'\) in .*add a folder per class"):
        discover(root)


def test_empty_class_folder_is_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path)
    (root / "birds").mkdir()
    _write(root / "birds" / "readme.txt", b"todo")
    with pytest.raises(DataError, match="'birds'.*no images"):
        discover(root)


def test_ignores_non_images_hidden_and_includes_nested(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=3)
    _write(root / "cats" / ".DS_Store", b"junk")
    _write(root / "cats" / "notes.txt", b"junk")
    _write(root / "cats" / ".hidden" / "x.jpg", _jpeg_bytes())
    _write(root / ".git" / "y.jpg", _jpeg_bytes())
    _write(root / "cats" / "more" / "deep.jpg", _jpeg_bytes())
    splits = discover(root)
    paths = [s.path for s in splits.train.samples + splits.val.samples]
    assert splits.train.classes == ["cats", "dogs"]
    assert len(paths) == 7 and root / "cats" / "more" / "deep.jpg" in paths


def test_train_val_folders(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, classes=("b", "a", "c"), n=4, val_n=2)
    (root / "val").rename(root / "validation")
    splits = discover(root)
    assert splits.source == "train/val folders"
    assert splits.train.classes == ["a", "b", "c"]
    assert list(splits.train.class_counts()) == [4, 4, 4] and list(splits.val.class_counts()) == [2, 2, 2]
    assert all(s.path.parent.name == splits.train.classes[s.label] for s in splits.val.samples)


def test_val_folder_with_unknown_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=2, val_n=1)
    _write(root / "val" / "zebras" / "z.jpg", _jpeg_bytes())
    with pytest.raises(DataError, match="'zebras'"):
        discover(root)


def test_seeded_stratified_split(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, classes=("a", "b", "c"), n=7)
    _write(root / "d" / "only.jpg", _jpeg_bytes())
    _write(root / "e" / "one.jpg", _jpeg_bytes())
    _write(root / "e" / "two.jpg", _jpeg_bytes())
    a, b = discover(root, seed=3), discover(root, seed=3)
    assert a.source == "class folders (seeded stratified split)"
    assert a.train.samples == b.train.samples and a.val.samples == b.val.samples
    assert any(discover(root, seed=s).val.samples != a.val.samples for s in range(4, 10))
    assert list(a.val.class_counts()) == [1, 1, 1, 0, 1]  # round(7 * 0.2) = 1; a single image stays in train
    assert list(a.train.class_counts()) == [6, 6, 6, 1, 1]
    assert not {s.path for s in a.train.samples} & {s.path for s in a.val.samples}


def test_explicit_class_order(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, classes=("cats", "dogs"), n=4)
    splits = discover(root, classes=["dogs", "cats", "fish"])
    assert splits.train.classes == ["dogs", "cats", "fish"]
    assert all(s.path.parent.name == ["dogs", "cats"][s.label] for s in splits.train.samples)
    with pytest.raises(DataError, match="'cats'"):
        discover(root, classes=["dogs", "horses"])


# ------------------------------------------------------------------------------------------- csv


def test_csv_with_split_column(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=4)
    rows = ["path,label,split"] + [
        f"{p.relative_to(root).as_posix()},{p.parent.name},{'val' if i % 4 == 0 else 'train'}"
        for i, p in enumerate(sorted(root.rglob("*.*")))
    ]
    csv_path = _write(root / "labels.csv", ("\n".join(rows) + "\n").encode())
    splits = discover(csv_path)
    assert splits.source == "csv" and splits.train.classes == ["cats", "dogs"]
    assert len(splits.train) == 6 and len(splits.val) == 2
    assert len(load_eval_set(csv_path, ["dogs", "cats"])) == 2


def test_csv_without_split_is_split_stratified(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=5)
    rows = ["path,label"] + [f"{p.relative_to(root).as_posix()},{p.parent.name}" for p in sorted(root.rglob("*.*"))]
    csv_path = _write(tmp_path / "labels.csv", ("\n".join(rows) + "\n").replace("cats/", "data/cats/")
                      .replace("dogs/", "data/dogs/").encode())
    splits = discover(csv_path, seed=1)
    assert list(splits.val.class_counts()) == [1, 1] and list(splits.train.class_counts()) == [4, 4]


@pytest.mark.parametrize(
    "text, needle",
    [
        ("file,label\na.jpg,cats\n", "missing column"),
        ("path,label\nmissing.jpg,cats\n", "row 2: file 'missing.jpg' not found"),
        ("path,label\n", "no data rows"),
        ("path,label,split\nimg.jpg,cats,test\n", "row 2: split 'test'"),
    ],
)
def test_bad_csv(tmp_path, text, needle):
    _write(tmp_path / "img.jpg", _jpeg_bytes())
    with pytest.raises(DataError, match=needle):
        discover(_write(tmp_path / "labels.csv", text.encode()))


# ---------------------------------------------------------------------------------- load_eval_set


def test_load_eval_set_uses_val_and_class_order(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=3, val_n=2)
    ds = load_eval_set(root, ["dogs", "cats"])
    assert ds.classes == ["dogs", "cats"] and len(ds) == 4
    assert all(s.path.parts[-3] == "val" and s.path.parent.name == ds.classes[s.label] for s in ds.samples)
    assert len(load_eval_set(root / "train", ["cats", "dogs"])) == 6
    with pytest.raises(DataError, match="'dogs'"):
        load_eval_set(root, ["cats", "birds"])


# -------------------------------------------------------------------------------------- balance


def test_class_weights():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 20)
    w = class_weights(labels, 3)
    assert w.dtype == np.float32 and np.isclose(w.mean(), 1.0)
    assert w[1] > w[2] > w[0] and np.isclose(w[1] / w[0], 3.0)
    assert np.allclose(class_weights(np.array([0, 1, 0, 1]), 2), 1.0)
    assert class_weights(np.array([0, 0, 2]), 3)[1] == 0.0


def test_balanced_indices():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = balanced_indices(labels, 30000, np.random.default_rng(0))
    assert idx.dtype == np.int64 and idx.shape == (30000,) and idx.max() < len(labels)
    share = np.bincount(labels[idx], minlength=3) / idx.size
    assert np.allclose(share, 1 / 3, atol=0.02)
    again = balanced_indices(labels, 30000, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)


# -------------------------------------------------------------------------------- real dataset


def test_hymenoptera_layout(hymenoptera):
    splits = discover(hymenoptera)
    assert splits.source == "train/val folders" and splits.train.classes == ["ants", "bees"]
    assert (len(splits.train), len(splits.val)) == (245, 153)
    gif = read_image(hymenoptera / "train" / "ants" / "imageNotFound.gif")
    assert gif.shape == (300, 300, 3)
