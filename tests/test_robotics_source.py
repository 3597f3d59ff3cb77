"""Bags replayed as live sources: bag time, recorded-speed pacing with stale frames dropped, the "bag" scheme."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tests.conftest import synthetic_image
from toolkit.errors import EdgetuneError
from toolkit.robotics.bag_source import BagSource, parse_spec
from toolkit.robotics.write_bags import START_NS, TopicSpec, write_image_bag

pytest.importorskip("rosbags")


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    frames = [synthetic_image(i % 3, i, (48, 64)) for i in range(12)]
    path = write_image_bag(tmp_path_factory.mktemp("src") / "run.bag", "ros1",
                           {"/cam": TopicSpec(frames, "bgr8", fps=20), "/cam/jpeg": TopicSpec(frames, "jpeg", fps=20)},
                           other_topics=["/status"])
    return path, frames


def test_as_fast_as_possible_plays_every_frame_with_bag_time(bag):
    path, frames = bag
    with BagSource(path, topic="/cam", rate=0) as source:
        got = list(source.frames())
    assert [f.index for f in got] == list(range(12))
    assert [f.timestamp_ns for f in got] == [START_NS + i * 50_000_000 for i in range(12)]
    assert all(np.array_equal(f.image, frame) for f, frame in zip(got, frames))
    assert source.dropped == 0


def test_recorded_speed_drops_stale_frames_for_a_slow_consumer(bag):
    path, _ = bag
    with BagSource(path, topic="/cam/jpeg", rate=1) as source:
        t0 = time.monotonic()
        got = []
        for frame in source.frames():
            got.append(frame)
            time.sleep(0.12)  # a model slower than the 20 fps camera
        wall = time.monotonic() - t0
    assert source.dropped > 0 and len(got) + source.dropped == 12
    assert got[0].index == 0 and got[-1].index == 11  # the newest frame is never the one dropped
    assert wall < 12 * 0.12  # paced by the bag, not by playing every frame late

    with BagSource(path, topic="/cam", rate=2) as fast:
        t0 = time.monotonic()
        assert len(list(fast.frames())) == 12 and fast.dropped == 0
        assert 0.2 <= time.monotonic() - t0 < 1.5  # 0.55 s of bag time at 2x


def test_close_from_another_thread_ends_a_replay(bag):
    path, _ = bag
    source = BagSource(path, topic="/cam", rate=0.01)  # 100x slower than recorded: would take a minute
    threading.Timer(0.3, source.close).start()
    t0 = time.monotonic()
    assert len(list(source.frames())) == 1
    assert time.monotonic() - t0 < 5


def test_spec_and_registered_scheme(bag):
    path, _ = bag
    assert parse_spec(f"bag:{path}?topic=/cam&rate=0") == (path, {"topic": "/cam", "rate": "0"})
    assert parse_spec(f"bag:{path}?topic=/cam", {"rate": 2.0, "topic": None}) == (path, {"topic": "/cam", "rate": 2.0})
    from toolkit.sources import open_source

    with open_source(f"bag:{path}?topic=/cam&rate=0") as source:
        frame = next(iter(source.frames()))
    assert frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8


@pytest.mark.parametrize("spec, fragment", [
    ("bag:{path}?topic=/nope", "Unknown topic '/nope'"),
    ("bag:{path}?topic=/status", "std_msgs/msg/String"),
    ("bag:{path}", "Give the topic"),
    ("bag:{path}?topic=/cam&speed=2", "Unknown bag source option(s) speed"),
    ("bag:{path}?topic=/cam&rate=fast", "rate 'fast'"),
    ("bag:/no/such.bag?topic=/cam", "does not exist"),
])
def test_bad_specs_are_one_line_errors(bag, spec, fragment):
    from toolkit.robotics.bag_source import open_bag_source

    path, _ = bag
    with pytest.raises(EdgetuneError) as err:
        open_bag_source(spec.format(path=path), {})
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_recording_a_jpeg_bag_keeps_the_robots_own_bytes(bag, tmp_path):
    import cv2
    from mcap.reader import make_reader

    from toolkit.robotics.foxglove_sink import FoxgloveSink

    path, frames = bag
    with BagSource(path, topic="/cam/jpeg", rate=0) as source, FoxgloveSink(record=tmp_path / "r.mcap") as sink:
        for frame in source.frames():
            sink.write(frame, _Result())
    with open(tmp_path / "r.mcap", "rb") as f:
        payloads = [m.data for _, c, m in make_reader(f).iter_messages() if c.topic == "/edgetune/image"]
    originals = [cv2.imencode(".jpg", frame)[1].tobytes() for frame in frames]
    assert len(payloads) == 12 and all(original in payload for original, payload in zip(originals, payloads))


class _Result:
    label, confidence, topk, unknown, latency_ms = "a", 1.0, [("a", 1.0)], False, 1.0


def test_watch_replays_a_bag_records_mcap_and_serves_foxglove(bag, exported, tmp_path):
    import json

    from click.testing import CliRunner
    from mcap.reader import make_reader

    from toolkit.cli import cli

    path, _ = bag
    bundle = exported("onnx").out_dir
    recording = tmp_path / "watch.mcap"
    result = CliRunner().invoke(cli, ["watch", str(bundle), "--source", f"bag:{path}", "--topic", "/cam/jpeg",
                                      "--rate", "0", "--json", "--record", str(recording),
                                      "--foxglove", "--foxglove-port", "0"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["frame"] for r in lines] == list(range(12))
    assert [r["timestamp_ns"] for r in lines] == [START_NS + i * 50_000_000 for i in range(12)]  # bag time
    assert "Foxglove: open connection ws://127.0.0.1:" in result.output
    with open(recording, "rb") as f:
        predictions = [json.loads(m.data) for _, c, m in make_reader(f).iter_messages() if c.topic == "/edgetune/prediction"]
    assert [p["label"] for p in predictions] == [r["label"] for r in lines]
    assert [p["confidence"] for p in predictions] == pytest.approx([r["confidence"] for r in lines], abs=1e-5)

    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(path), "--topic", "/cam"])
    assert r.exit_code == 2 and "apply to bag sources" in r.output
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", f"bag:{path}?topic=/cam", "--record", str(recording)])
    assert r.exit_code == 2 and "already exists" in r.output


def test_bag_import_replay_and_recording_work_without_torch(bag, exported, tmp_path):
    from tests.test_robot import _no_torch

    path, _ = bag
    out = _no_torch("import-bag", str(path), "--topic", "/cam", "--out", str(tmp_path / "data"), "--label", "a")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list((tmp_path / "data" / "a").iterdir())) == 12
    out = _no_torch("watch", str(exported("onnx").out_dir), "--source", f"bag:{path}?topic=/cam", "--rate", "0",
                    "--json", "--record", str(tmp_path / "r.mcap"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert sum(x.startswith("{") for x in out.stdout.splitlines()) == 12 and (tmp_path / "r.mcap").is_file()
