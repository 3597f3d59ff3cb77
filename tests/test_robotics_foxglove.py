"""FoxgloveSink: predictions recorded to MCAP (read back with the mcap reader) and served live
over the Foxglove WebSocket protocol (a websockets client connects on localhost)."""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import synthetic_image

pytest.importorskip("foxglove")
mcap_reader = pytest.importorskip("mcap.reader")

from toolkit.errors import EdgetuneError  # noqa: E402
from toolkit.robotics.foxglove_sink import FoxgloveSink  # noqa: E402

T0 = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class Frame:  # the shape of toolkit.sources.Frame
    image: np.ndarray
    timestamp_ns: int
    index: int


@dataclass(frozen=True)
class Result:  # the fields of toolkit.classify.Classification the sink reads
    label: str
    confidence: float
    topk: list
    unknown: bool
    latency_ms: float


def _frames(n: int = 5):
    for i in range(n):
        label = ("ants", "bees")[i % 2]
        yield (Frame(synthetic_image(i % 2, i, (96, 128)), T0 + i * 50_000_000, 10 + i),
               Result(label, 0.8 - i / 100, [(label, 0.8 - i / 100), ("other", 0.2 + i / 100)], i == 4, 3.5 + i))


class JsonDecoderFactory:
    def decoder_for(self, message_encoding, schema):
        return json.loads if message_encoding == "json" else None


def _read(path: Path):
    from mcap_protobuf.decoder import DecoderFactory

    with open(path, "rb") as f:
        reader = mcap_reader.make_reader(f, decoder_factories=[DecoderFactory(), JsonDecoderFactory()])
        by_topic: dict[str, list] = {}
        for schema, channel, message, decoded in reader.iter_decoded_messages():
            by_topic.setdefault(channel.topic, []).append((schema.name, message.log_time, decoded))
    return by_topic


def test_mcap_recording_reads_back_with_the_mcap_reader(tmp_path):
    out = tmp_path / "run.mcap"
    frames = list(_frames())
    with FoxgloveSink(record=out) as sink:
        for frame, result in frames:
            sink.write(frame, result)
    assert not list(tmp_path.glob(".*partial"))
    topics = _read(out)
    assert set(topics) == {"/edgetune/image", "/edgetune/annotations", "/edgetune/prediction"}

    images = topics["/edgetune/image"]
    assert [s for s, _, _ in images] == ["foxglove.CompressedImage"] * 5
    assert [t for _, t, _ in images] == [f.timestamp_ns for f, _ in frames]  # source time, not wall time
    for (_, _, msg), (frame, _) in zip(images, frames):
        assert msg.format == "jpeg" and msg.timestamp.ToNanoseconds() == frame.timestamp_ns
        decoded = cv2.imdecode(np.frombuffer(msg.data, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == frame.image.shape
        assert np.abs(decoded.astype(int) - frame.image).mean() < 4  # JPEG, quality 85

    assert topics["/edgetune/prediction"][0][0] == "edgetune.Prediction"
    predictions = [msg for _, _, msg in topics["/edgetune/prediction"]]
    assert [p["label"] for p in predictions] == [r.label for _, r in frames]
    last = predictions[-1]
    assert last["frame_index"] == 14 and last["unknown"] is True and last["latency_ms"] == 7.5
    assert last["topk"] == [{"label": "ants", "confidence": 0.76}, {"label": "other", "confidence": 0.24}]
    assert last["timestamp"] == {"sec": 1_700_000_000, "nsec": 200_000_000}

    texts = [msg.texts[0].text for _, _, msg in topics["/edgetune/annotations"]]
    assert texts[0] == "ants 0.80" and texts[-1] == "unknown 0.76"


def test_recording_never_replaces_a_file_and_must_be_mcap(tmp_path):
    existing = tmp_path / "old.mcap"
    existing.write_bytes(b"user data")
    with pytest.raises(EdgetuneError, match="already exists"):
        FoxgloveSink(record=existing)
    assert existing.read_bytes() == b"user data"
    with pytest.raises(EdgetuneError, match=r"\*\.mcap"):
        FoxgloveSink(record=tmp_path / "out.bag")
    with pytest.raises(EdgetuneError, match="does not exist"):
        FoxgloveSink(record=tmp_path / "nope" / "out.mcap")


def test_a_failing_frame_is_reported_and_the_recording_still_finished(tmp_path):
    out = tmp_path / "run.mcap"
    sink = FoxgloveSink(record=out)
    frame, result = next(_frames(1))
    sink.write(frame, result)
    sink.write(Frame(np.zeros((0, 0, 3), np.uint8), T0, 99), result)  # nothing to encode
    with pytest.raises(Exception):
        sink.close()
    assert len(_read(out)["/edgetune/prediction"]) == 1  # what was seen before the failure is kept


def test_live_server_streams_predictions_to_a_websocket_client():
    websockets = pytest.importorskip("websockets")
    sink = FoxgloveSink(port=0)  # any free port, on 127.0.0.1
    try:
        assert sink.port and sink.port > 0
        received = asyncio.run(_subscribe_and_receive(websockets, sink))
    finally:
        sink.close()
    channels, op, subscription, log_time, payload = received
    assert channels["/edgetune/prediction"]["schemaName"] == "edgetune.Prediction"
    assert channels["/edgetune/image"]["schemaName"] == "foxglove.CompressedImage"
    assert (op, subscription) == (1, 7)  # MessageData on our subscription
    frame, result = next(_frames(1))
    assert log_time == frame.timestamp_ns
    assert json.loads(payload)["label"] == result.label


async def _subscribe_and_receive(websockets, sink):
    url = f"ws://127.0.0.1:{sink.port}"
    async with websockets.connect(url, subprotocols=["foxglove.sdk.v1"]) as ws:
        channels = {}
        while "/edgetune/prediction" not in channels:
            message = await asyncio.wait_for(ws.recv(), 10)
            if isinstance(message, str) and json.loads(message)["op"] == "advertise":
                channels.update({c["topic"]: c for c in json.loads(message)["channels"]})
        subscribe = {"op": "subscribe", "subscriptions": [{"id": 7, "channelId": channels["/edgetune/prediction"]["id"]}]}
        await ws.send(json.dumps(subscribe))
        frame, result = next(_frames(1))
        for _ in range(50):  # the server applies the subscription asynchronously: publish until it arrives
            sink.write(frame, result)
            try:
                while True:
                    message = await asyncio.wait_for(ws.recv(), 0.2)
                    if isinstance(message, bytes):
                        op, subscription, log_time = struct.unpack_from("<BIQ", message)
                        return channels, op, subscription, log_time, message[13:]
            except asyncio.TimeoutError:
                continue
        raise AssertionError("no message arrived over the WebSocket")
