"""`edgetune import-bag`: bags written here with the rosbags writers (ROS 1, ROS 2 sqlite3 and mcap)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import synthetic_image
from toolkit.cli import cli
from toolkit.robotics.write_bags import FORMATS, START_NS, TopicSpec, storage_file, write_image_bag

pytest.importorskip("rosbags")

RNG = np.random.default_rng(0)
H, W = 12, 10


def _bag(tmp_path: Path, fmt: str, topics: dict, **kw) -> Path:
    return write_image_bag(tmp_path / ("in.bag" if fmt == "ros1" else "in_bag"), fmt, topics, **kw)


def _run(*args):
    return CliRunner().invoke(cli, ["import-bag", *map(str, args)])


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))


def _provenance(out: Path, name: str = "provenance.csv") -> list[dict]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- pixels round trip

def _noise(shape, dtype=np.uint8):
    return RNG.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


LOSSLESS = {  # encoding -> (frames as stored in the message, expected file pixels as OpenCV reads them)
    "rgb8": (lambda x: x, lambda x: x[:, :, ::-1], (H, W, 3), np.uint8),
    "bgr8": (lambda x: x, lambda x: x, (H, W, 3), np.uint8),
    "rgba8": (lambda x: x, lambda x: x[:, :, [2, 1, 0, 3]], (H, W, 4), np.uint8),
    "bgra8": (lambda x: x, lambda x: x, (H, W, 4), np.uint8),
    "mono8": (lambda x: x, lambda x: x, (H, W), np.uint8),
    "mono16": (lambda x: x, lambda x: x, (H, W), np.uint16),
    "bayer_rggb8": (lambda x: x, lambda x: cv2.cvtColor(x, cv2.COLOR_BayerBG2BGR), (H, W), np.uint8),
    "bayer_gbrg8": (lambda x: x, lambda x: cv2.cvtColor(x, cv2.COLOR_BayerGR2BGR), (H, W), np.uint8),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_raw_encodings_round_trip_pixel_exact_with_row_padding(tmp_path, fmt):
    frames = {enc: [_noise(shape, dtype) for _ in range(3)] for enc, (_, _, shape, dtype) in LOSSLESS.items()}
    topics = {f"/cam/{enc}": TopicSpec(frames[enc], enc, padding=5 if i % 2 else 0,
                                       bigendian=enc == "mono16" and fmt == "ros1")
              for i, enc in enumerate(LOSSLESS)}
    bag = _bag(tmp_path, fmt, topics)
    for enc, (_, expect, _, _) in LOSSLESS.items():
        out = tmp_path / f"out_{enc}"
        result = _run(bag, "--topic", f"/cam/{enc}", "--out", out, "--label", "x")
        assert result.exit_code == 0, result.output
        files = _images(out / "x")
        assert len(files) == 3
        for f, original in zip(files, frames[enc]):
            got = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)
            assert got.dtype == original.dtype and np.array_equal(got, expect(original)), (enc, f)


def test_twelve_bit_frames_in_a_sixteen_bit_image_are_named(tmp_path):
    # 16-bit images are read by their high byte, so 0..4095 data would train as near-black images.
    twelve_bit = [RNG.integers(0, 4096, (H, W), dtype=np.uint16) for _ in range(2)]
    full = [_noise((H, W), np.uint16) for _ in range(2)]
    bag = _bag(tmp_path, "ros2-mcap", {"/mono12": TopicSpec(twelve_bit, "mono16"), "/mono16": TopicSpec(full, "mono16")})
    result = _run(bag, "--topic", "/mono16", "--out", tmp_path / "full", "--label", "x")
    assert result.exit_code == 0 and "high byte" not in result.output
    result = _run(bag, "--topic", "/mono12", "--out", tmp_path / "low", "--label", "x")
    assert result.exit_code == 0 and "high byte" in " ".join(result.output.split()), result.output


def test_bayer_pattern_names_follow_ros(tmp_path):
    # A pure red scene seen through an RGGB mosaic: only the top-left site of each 2x2 block is lit.
    mosaic = np.zeros((8, 8), np.uint8)
    mosaic[0::2, 0::2] = 200
    bag = _bag(tmp_path, "ros2-mcap", {"/cam": TopicSpec([mosaic], "bayer_rggb8")})
    assert _run(bag, "--out", tmp_path / "o").exit_code == 0
    b, g, r = cv2.imread(str(_images(tmp_path / "o")[0]))[4, 4]
    assert (r, g, b) == (200, 0, 0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_images_are_stored_byte_for_byte(tmp_path, fmt):
    frames = [synthetic_image(i % 3, i, (48, 64)) for i in range(4)]
    bag = _bag(tmp_path, fmt, {"/jpg": TopicSpec(frames, "jpeg"), "/png": TopicSpec(frames, "png")})
    for topic, ext in (("/jpg", ".jpg"), ("/png", ".png")):
        out = tmp_path / topic.strip("/")
        assert _run(bag, "--topic", topic, "--out", out, "--label", "a").exit_code == 0
        files = _images(out)
        assert [f.suffix for f in files] == [ext] * 4
        for f, frame in zip(files, frames):
            assert f.read_bytes() == cv2.imencode(ext, frame)[1].tobytes()
        if ext == ".png":
            assert np.array_equal(cv2.imread(str(files[0])), frames[0])


def test_ros2_storage_file_and_folder_both_open(tmp_path):
    bag = _bag(tmp_path, "ros2-sqlite3", {"/cam": TopicSpec([_noise((H, W, 3))], "bgr8")})
    assert _run(storage_file(bag), "--out", tmp_path / "a").exit_code == 0
    assert _run(bag, "--out", tmp_path / "b").exit_code == 0


# ---------------------------------------------------------------------------- labels and thinning

def test_label_ranges_thinning_and_provenance(tmp_path):
    frames = [synthetic_image(0, i, (24, 32)) for i in range(20)]  # 10 fps: t = 0.0 .. 1.9 s
    bag = _bag(tmp_path, "ros1", {"/cam": TopicSpec(frames, "bgr8")})
    ranges = tmp_path / "ranges.csv"
    ranges.write_text("start,end,label\n0.0,0.5,ants\n1.0,1.95,bees\n")
    out = tmp_path / "data"
    result = _run(bag, "--topic", "/cam", "--out", out, "--labels", ranges, "--min-interval", "0.25")
    assert result.exit_code == 0, result.output
    rows = _provenance(out)
    times = {r["label"]: [float(x["seconds_from_start"]) for x in rows if x["label"] == r["label"]] for r in rows}
    assert times == {"ants": [0.0, 0.3], "bees": [1.0, 1.3, 1.6, 1.9]}
    assert {r["topic"] for r in rows} == {"/cam"} and all(Path(r["bag"]) == bag.resolve() for r in rows)
    assert all((out / r["path"]).is_file() and r["path"].startswith(r["label"] + "/") for r in rows)
    assert int(rows[0]["timestamp_ns"]) == START_NS == int(rows[0]["header_stamp_ns"])

    # The same ranges in bag (epoch) time select the same images.
    epoch = START_NS / 1e9
    ranges.write_text(f"{epoch},{epoch + 0.5},ants\n{epoch + 1},{epoch + 1.95},bees\n")
    assert _run(bag, "--out", tmp_path / "epoch", "--labels", ranges, "--min-interval", "0.25").exit_code == 0
    assert [r["path"] for r in _provenance(tmp_path / "epoch")] == [r["path"] for r in rows]

    out = tmp_path / "every"
    assert _run(bag, "--out", out, "--every", "3", "--max-images", "4", "--layout", "csv").exit_code == 0
    rows = _provenance(out, "labels.csv")
    assert [float(r["seconds_from_start"]) for r in rows] == [0.0, 0.3, 0.6, 0.9]
    assert all(r["label"] == "" and r["path"].startswith("images/") for r in rows)


def test_import_then_train(tmp_path):
    pytest.importorskip("torch")
    colours = {"red": 0, "green": 1, "blue": 2}
    frames = [synthetic_image(colours[c], i, (96, 128)) for c in colours for i in range(8)]
    bag = _bag(tmp_path, "ros2-mcap", {"/cam": TopicSpec(frames, "jpeg", fps=8)})  # one second per class
    ranges = tmp_path / "r.csv"
    ranges.write_text("".join(f"{i},{i + 1},{c}\n" for i, c in enumerate(colours)))
    data = tmp_path / "data"
    result = _run(bag, "--out", data, "--labels", ranges)
    assert result.exit_code == 0, result.output
    assert "next: edgetune train" in result.output
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(data), "--out", str(run), "--backbone", "efficientnet_lite0",
                                      "--views", "1", "--epochs", "3"])
    assert result.exit_code == 0, result.output

    recording = tmp_path / "predictions.mcap"
    result = CliRunner().invoke(cli, ["predict", str(run), str(data / "red"), "--record", str(recording), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    from mcap.reader import make_reader

    with open(recording, "rb") as f:
        messages = [(c.topic, m) for _, c, m in make_reader(f).iter_messages()]
    import json

    predictions = [json.loads(m.data) for topic, m in messages if topic == "/edgetune/prediction"]
    images = [m for topic, m in messages if topic == "/edgetune/image"]
    assert len(predictions) == len(images) == 8
    assert {p["label"] for p in predictions} <= set(colours) and all(len(p["topk"]) == 2 for p in predictions)
    assert sorted(m.log_time for m in images) == sorted(f.stat().st_mtime_ns for f in (data / "red").iterdir())


def test_list_names_topics_types_and_counts(tmp_path):
    bag = _bag(tmp_path, "ros1", {"/cam": TopicSpec([_noise((H, W, 3))] * 2, "rgb8")}, other_topics=["/status"])
    result = _run(bag, "--list")
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()}
    assert lines["/cam"] == ["sensor_msgs/msg/Image", "2", "image"]
    assert lines["/status"] == ["std_msgs/msg/String", "3"]


# ---------------------------------------------------------------------------- bad input

def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _nothing_written(parent: Path, out: Path):
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_corrupt_bags_are_one_line_errors(tmp_path, fmt):
    bag = _bag(tmp_path, fmt, {"/cam": TopicSpec([_noise((64, 64, 3)) for _ in range(20)], "bgr8")})
    source = bag if fmt == "ros1" else storage_file(bag)
    data = source.read_bytes()
    for name, payload in (("truncated", data[: len(data) // 2]), ("garbage", b"\x00garbage" * 1000)):
        broken = tmp_path / f"{name}{source.suffix}"
        broken.write_bytes(payload)
        out = tmp_path / f"out_{name}"
        _one_line_error(_run(broken, "--topic", "/cam", "--out", out), "Cannot read bag", str(broken))
        _nothing_written(tmp_path, out)


def test_bad_input_one_line_exit_2_nothing_written(tmp_path):
    bag = _bag(tmp_path, "ros2-mcap", {"/camera/image": TopicSpec([_noise((H, W, 3))], "bgr8"),
                                       "/camera/depth": TopicSpec([RNG.random((H, W), np.float32)], "32FC1")},
               other_topics=["/status"])
    out = tmp_path / "data"
    _one_line_error(_run(tmp_path / "missing.bag", "--topic", "/x", "--out", out), "missing.bag", "does not exist")
    _one_line_error(_run(bag, "--topic", "/camera/imag", "--out", out), "'/camera/imag'", "/camera/image", "/camera/depth")
    _one_line_error(_run(bag, "--topic", "/status", "--out", out), "std_msgs/msg/String", "Image topics: /camera/depth, /camera/image")
    _one_line_error(_run(bag, "--topic", "/camera/depth", "--out", out), "Unknown image encoding '32FC1'")
    for text, fragment in (("0,2,a\n1,3,b\n", "overlap"), ("0,abc,a\n", "'abc' is not a number"),
                           ("0,1\n", "expected 3 columns"), ("2,1,a\n", "not after start"), ("0,1,../x\n", "folder name")):
        labels = tmp_path / "labels.csv"
        labels.write_text(text)
        _one_line_error(_run(bag, "--topic", "/camera/image", "--out", out, "--labels", labels), str(labels), fragment)
    labels.write_text("100,200,a\n")
    _one_line_error(_run(bag, "--topic", "/camera/image", "--out", out, "--labels", labels), "No --labels range meets", "spans")
    _nothing_written(tmp_path, out)

    out.mkdir()
    (out / "mine.txt").write_text("user data")
    _one_line_error(_run(bag, "--topic", "/camera/image", "--out", out), "--overwrite")
    assert (out / "mine.txt").read_text() == "user data"


def test_broken_message_is_skipped_and_counted(tmp_path):
    jpegs = [cv2.imencode(".jpg", synthetic_image(0, i))[1].tobytes() for i in range(3)]
    jpegs[1] = jpegs[1][: len(jpegs[1]) // 2]  # a frame cut short in transit
    bag = _bag(tmp_path, "ros1", {"/cam": TopicSpec(jpegs, "jpeg")})
    result = _run(bag, "--out", tmp_path / "o", "--label", "a")
    assert result.exit_code == 0, result.output
    assert "1 broken" in result.output
    assert [f.read_bytes() for f in _images(tmp_path / "o")] == [jpegs[0], jpegs[2]]


def test_an_edgetune_recording_is_not_mistaken_for_a_bag(tmp_path):
    from toolkit.robotics.foxglove_sink import FoxgloveSink

    recording = tmp_path / "predictions.mcap"
    FoxgloveSink(record=recording).close()
    _one_line_error(_run(recording, "--list"), "Only ROS 2 MCAP recordings are bags")
