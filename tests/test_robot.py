"""Robot side: the classify API, live sources, `edgetune watch` (video written by OpenCV here)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import cli
from toolkit.errors import EdgetuneError

from .conftest import synthetic_image


def write_video(path: Path, n: int, fps: float = 30.0, size: tuple[int, int] = (96, 128)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (size[1], size[0]))
    assert writer.isOpened()
    for i in range(n):
        writer.write(synthetic_image(i % 2, i, size))
    writer.release()
    return path


@pytest.fixture(scope="module")
def bundle(exported) -> Path:
    return exported("onnx").out_dir


def test_classify_api_matches_predictor(bundle):
    import toolkit

    clf = toolkit.load(bundle)
    frame = synthetic_image(0, 3, (120, 160))  # BGR, as OpenCV gives it
    r = clf.classify(frame)
    p = clf.predictor
    ref = p.predict(p.preprocess(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), rgb=True)[None])[0]
    assert r.label == clf.labels[int(ref.argmax())]
    assert r.label in clf.labels and 0.0 <= r.confidence <= 1.0 and r.latency_ms > 0
    assert r.topk[0] == (r.label, r.confidence) and len(r.topk) == len(clf.labels)
    assert np.isclose(r.probabilities.sum(), 1.0, atol=1e-5)
    rgb = clf.classify(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), rgb=True)
    assert np.allclose(rgb.probabilities, r.probabilities, atol=1e-6)
    batch = clf.classify_batch([frame, frame[:, ::-1].copy()])
    assert len(batch) == 2 and np.allclose(batch[0].probabilities, r.probabilities, atol=1e-5)
    json.dumps(r.to_dict())


def test_classify_threads_agree(bundle):
    import toolkit

    clf = toolkit.load(bundle)
    frames = [synthetic_image(i % 2, i, (100, 140)) for i in range(6)]
    expected = [clf.classify(f).probabilities for f in frames]
    errors: list[str] = []

    def worker():
        for _ in range(3):
            for f, e in zip(frames, expected):
                if not np.allclose(clf.classify(f).probabilities, e, atol=1e-5):
                    errors.append("mismatch")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_unknown_threshold_override(bundle):
    import toolkit

    frame = synthetic_image(0, 1)
    conf = toolkit.load(bundle).classify(frame).confidence
    # The override, not the bundle's threshold, decides: everything is known at 0, and at a
    # threshold just above this frame's confidence the frame is unknown (when it is not saturated).
    assert not toolkit.load(bundle, unknown_threshold=0.0).classify(frame).unknown
    strict = toolkit.load(bundle, unknown_threshold=min(1.0, conf + 1e-4)).classify(frame)
    assert strict.unknown == (conf < 1.0)
    assert not toolkit.load(bundle, unknown_threshold=conf - 1e-4).classify(frame).unknown
    with pytest.raises(EdgetuneError, match="between 0 and 1"):
        toolkit.load(bundle, unknown_threshold=1.5)


def test_video_file_every_frame_and_realtime_drops(tmp_path):
    from toolkit.sources import open_source

    video = write_video(tmp_path / "v.avi", 20, fps=200.0)
    with open_source(str(video), realtime=False) as src:
        frames = list(src.frames())
    assert [f.index for f in frames] == list(range(20)) and frames[0].image.shape == (96, 128, 3)
    assert frames[1].timestamp_ns - frames[0].timestamp_ns == pytest.approx(5e6, abs=1)
    with open_source(str(video)) as src:  # played at 200 fps to a consumer taking 30 ms a frame
        taken, received = [], []
        for f in src.frames():
            taken.append(f.index)
            received.append((f.received, time.perf_counter()))
            time.sleep(0.03)
        dropped = src.dropped
    assert dropped > 0 and len(taken) + dropped == 20
    assert taken == sorted(taken) and taken[-1] == 19  # the newest frame always wins
    # Live frames say when they were decoded (how long they waited for the consumer is measurable).
    assert all(r is not None and r <= now for r, now in received)
    assert [r for r, _ in received] == sorted(r for r, _ in received)


def test_folder_source_and_registered_scheme(tmp_path, make_image_folder):
    from toolkit.sources import Frame, Source, open_source, register_source

    folder = make_image_folder(tmp_path, n=3)
    with open_source(str(folder)) as src:
        assert len(list(src.frames())) == 6

    class Fake(Source):
        def __init__(self, rest, options):
            self.rest, self.options = rest, options

        def frames(self):
            yield Frame(np.zeros((8, 8, 3), np.uint8), 0, 0)

    register_source("fake", Fake)
    src = open_source("fake:x.bag?topic=/cam", rate=2.0)
    assert src.rest == "x.bag?topic=/cam" and src.options["rate"] == 2.0


def test_bad_sources(tmp_path):
    from toolkit.sources import open_source

    with pytest.raises(EdgetuneError, match="Camera 97 does not open"):
        open_source("97")
    with pytest.raises(EdgetuneError, match="not a camera index"):
        open_source(str(tmp_path / "nope.mp4"))
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(EdgetuneError, match="cannot be decoded"):
        open_source(str(tmp_path / "bad.mp4"))
    t0 = time.perf_counter()
    with pytest.raises(EdgetuneError, match="did not answer"):
        open_source("rtsp://127.0.0.1:9/none", open_timeout=1.0)
    assert time.perf_counter() - t0 < 30


def test_watch_cli_json_lines_and_video(bundle, tmp_path):
    video = write_video(tmp_path / "in.avi", 12)
    out = tmp_path / "out.avi"
    result = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(video), "--json", "--all-frames",
                                      "--every", "2", "--save-video", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["frame"] for r in lines] == [0, 2, 4, 6, 8, 10]
    assert {"label", "confidence", "unknown", "latency_ms", "timestamp_ns", "topk"} <= set(lines[0])
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6
    cap.release()
    assert not list(tmp_path.glob(".*partial*"))


def test_watch_cli_max_frames_and_bad_input(bundle, tmp_path):
    video = write_video(tmp_path / "in.avi", 30)
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(video), "--json", "--max-frames", "3"])
    assert r.exit_code == 0 and sum(line.startswith("{") for line in r.stdout.splitlines()) == 3
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", "98"])
    assert r.exit_code == 2 and "Camera 98 does not open" in r.output
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(video), "--every", "0"])
    assert r.exit_code == 2 and "--every" in r.output


def test_watch_stops_cleanly_on_interrupt(bundle, tmp_path):
    import toolkit
    from toolkit.sources import open_source
    from toolkit.watch import watch

    class Interrupting:
        closed = False

        def __init__(self):
            self.n = 0

        def write(self, frame, result):
            self.n += 1
            if self.n == 2:
                raise KeyboardInterrupt

        def close(self):
            Interrupting.closed = True

    src = open_source(str(write_video(tmp_path / "v.avi", 10)), realtime=False)
    summary = watch(toolkit.load(bundle), src, [Interrupting()])
    assert summary.interrupted and summary.processed == 2 and Interrupting.closed

def test_watch_stopped_by_sigterm_keeps_its_video(bundle, tmp_path):
    # systemd / docker stop a robot's service with SIGTERM: the video is complete up to the last
    # classified frame, as after Ctrl-C, and the exit status says "interrupted".
    import signal

    video = write_video(tmp_path / "in.avi", 400)
    out = tmp_path / "out.avi"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "watch", str(bundle), "--source", str(video),
                             "--json", "--save-video", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]  # three frames classified
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and all(line.startswith("{") for line in lines)
    classified = 3 + sum(line.startswith("{") for line in rest.splitlines())
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == classified
    cap.release()
    assert not list(tmp_path.glob(".*partial*"))


def test_watch_video_of_a_folder_of_sizes_and_never_over_a_file(bundle, tmp_path, make_image_folder):
    folder = make_image_folder(tmp_path, n=2)
    cv2.imwrite(str(folder / "cats" / "wide.jpg"), np.full((60, 200, 3), 128, np.uint8))  # another size
    out = tmp_path / "out.avi"
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(folder), "--json", "--save-video", str(out)])
    assert r.exit_code == 0, r.output
    paths = [json.loads(line)["path"] for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(paths) == 5 and str(folder / "cats" / "wide.jpg") in paths  # each record names its photo
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 5  # every photo, the odd one letterboxed
    cap.release()
    before = out.read_bytes()
    r = CliRunner().invoke(cli, ["watch", str(bundle), "--source", str(folder), "--save-video", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output and out.read_bytes() == before


# Robot-side commands with torch unimportable (the `pip install edgetune` robot install).
_BLOCK_TORCH = """
import sys
class _NoTorch:  # as on a robot: `import torch` fails, and torch is not in sys.modules
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
sys.meta_path.insert(0, _NoTorch())
"""
_BLOCKED = _BLOCK_TORCH + """
import runpy
sys.argv = ["edgetune", *sys.argv[1:]]
runpy.run_module("toolkit.cli", run_name="__main__")
"""


# Three classes of 12 separable 16-dim features, for head fitting inside such a process.
BLOBS_CODE = (
    "import numpy as np\n"
    "rng = np.random.default_rng(0)\n"
    "y = np.repeat(np.arange(3), 12)\n"
    "x = (np.eye(3)[y] @ rng.normal(0, 2, (3, 16)) + rng.normal(0, 0.3, (36, 16))).astype(np.float32)\n")


def stdout_without_torch(code: str) -> str:
    """Run python `code` with torch unimportable (after BLOBS_CODE); its stdout, failing on an error."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _BLOCK_TORCH + BLOBS_CODE + code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _no_torch(*args: str):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", _BLOCKED, *args], cwd=root, capture_output=True, text=True,
                           timeout=300)


def test_robot_commands_without_torch(bundle, tmp_path, make_image_folder):
    import subprocess
    import sys

    images = make_image_folder(tmp_path, classes=("ants", "bees"), n=2, size=(120, 160))
    video = write_video(tmp_path / "v.avi", 6)
    out = _no_torch("predict", str(bundle), str(images), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len([json.loads(x) for x in out.stdout.splitlines()]) == 4
    out = _no_torch("watch", str(bundle), "--source", str(video), "--json", "--all-frames")
    assert out.returncode == 0, out.stderr[-2000:]
    assert sum(x.startswith("{") for x in out.stdout.splitlines()) == 6
    out = _no_torch("evaluate", str(bundle), str(images), "--unknown", str(images / "ants"), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["calibration"]["open_set"]["n_unknown"] == 2
    api = subprocess.run([sys.executable, "-c", _BLOCK_TORCH +
                          "import toolkit, numpy as np\n"
                          "r = toolkit.load(sys.argv[1]).classify(np.zeros((90, 120, 3), np.uint8))\n"
                          "print(r.label)", str(bundle)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert api.returncode == 0 and api.stdout.strip() in ("ants", "bees"), api.stderr[-2000:]
    out = _no_torch("train", str(images), "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "pip install 'edgetune[train]'" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_robot_path_skips_torch_where_it_is_installed(bundle):
    """onnxruntime-training imports torch while it imports (a build check): seconds of start-up on
    every `classify`/`learn`/`watch` process of a host that has torch. The robot path must not pay
    for it, and the training package must stay importable afterwards (the ORT training exporter)."""
    import importlib.util
    import subprocess
    import sys

    code = ("import sys, toolkit, numpy as np\n"
            "toolkit.load(sys.argv[1]).classify(np.zeros((90, 120, 3), np.uint8))\n"
            "print('torch' in sys.modules)\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('onnxruntime.training'):\n"
            "    import onnxruntime.training\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "ok"], (out.stdout, importlib.util.find_spec("torch") is not None)
