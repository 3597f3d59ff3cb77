"""What the model saw and said, on Foxglove channels: recorded to MCAP and/or served live.

One sink for `watch` and `predict` (the Sink protocol: write(frame, result), close()). Every frame
is published on three channels, stamped with the source's time (bag time for bags):
- `<prefix>/image`        foxglove.CompressedImage (JPEG), shown by Foxglove's Image panel;
- `<prefix>/annotations`  foxglove.ImageAnnotations: the label drawn on that image;
- `<prefix>/prediction`   JSON (schema PREDICTION_SCHEMA): label, confidence, top-k, unknown,
                          latency_ms, frame index; plottable and searchable in Foxglove.
`foxglove-sdk` writes the MCAP file and runs the WebSocket server; both hang off one private
context, so `--record` and `--foxglove` together encode each frame once. JPEG encoding and logging
run in a background thread (OpenCV releases the GIL) so the model's loop barely waits on them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

import cv2

from toolkit.errors import EdgetuneError

logger = logging.getLogger(__name__)

TOPIC_PREFIX = "/edgetune"
DEFAULT_PORT = 8765
JPEG_QUALITY = 85
_QUEUE_FRAMES = 4  # frames waiting for the encoder thread; write() blocks beyond this, never drops

PREDICTION_SCHEMA: dict[str, Any] = {
    "title": "edgetune.Prediction",
    "description": "One classification of one camera frame by an edgetune model",
    "type": "object",
    "properties": {
        "timestamp": {"type": "object", "title": "time",
                      "properties": {"sec": {"type": "integer"}, "nsec": {"type": "integer"}}},
        "frame_index": {"type": "integer"},
        "label": {"type": "string"},
        "confidence": {"type": "number", "description": "calibrated probability of label"},
        "unknown": {"type": "boolean", "description": "confidence below the bundle's unknown threshold"},
        "latency_ms": {"type": "number", "description": "model time for this frame"},
        "topk": {"type": "array", "items": {"type": "object", "properties": {
            "label": {"type": "string"}, "confidence": {"type": "number"}}}},
    },
}


def prediction_message(frame, result) -> dict[str, Any]:
    """The JSON prediction for one frame (frame: .timestamp_ns/.index; result: a Classification)."""
    t = int(frame.timestamp_ns)
    return {
        "timestamp": {"sec": t // 10**9, "nsec": t % 10**9},
        "frame_index": int(frame.index),
        "label": str(result.label),
        "confidence": round(float(result.confidence), 6),
        "unknown": bool(result.unknown),
        "latency_ms": round(float(result.latency_ms), 3),
        "topk": [{"label": str(name), "confidence": round(float(p), 6)} for name, p in result.topk],
    }


def check_record_path(path: Path) -> Path:
    """An MCAP path that can be written without losing anything: new, .mcap, folder writable."""
    path = Path(path)
    if path.suffix != ".mcap":
        raise EdgetuneError(f"--record {path}: the recording is an MCAP file, name it *.mcap.")
    if path.exists():
        raise EdgetuneError(f"--record {path} already exists: give a new file name (recordings are never replaced).")
    if not path.parent.is_dir():
        raise EdgetuneError(f"--record {path}: folder {path.parent} does not exist.")
    return path


class FoxgloveSink:
    """Publishes frames and predictions to an MCAP file (`record`) and/or a live server (`port`)."""

    def __init__(self, *, record: Path | None = None, port: int | None = None, host: str = "127.0.0.1",
                 prefix: str = TOPIC_PREFIX, frame_id: str = "camera", jpeg_quality: int = JPEG_QUALITY) -> None:
        import foxglove
        from foxglove.channels import CompressedImageChannel, ImageAnnotationsChannel

        if record is None and port is None:
            raise ValueError("FoxgloveSink needs a record path, a port, or both")
        self.record = check_record_path(record) if record is not None else None
        self._context = foxglove.Context()  # private: other sinks and libraries keep their own channels
        self._image = CompressedImageChannel(f"{prefix}/image", context=self._context)
        self._annotations = ImageAnnotationsChannel(f"{prefix}/annotations", context=self._context)
        self._prediction = foxglove.Channel(f"{prefix}/prediction", schema=PREDICTION_SCHEMA, context=self._context)
        self._frame_id = frame_id
        self._jpeg = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
        self._writer = self._server = None
        # The MCAP is written under a hidden name and renamed when finished, so `record` never
        # names a file without its summary section (an interrupted one is left as .partial).
        self._partial = self.record.with_name(f".{self.record.name}.partial") if self.record else None
        try:
            if self.record is not None:
                from foxglove.mcap import MCAPCompression, MCAPWriteOptions

                # JPEG does not compress further: LZ4 on one thread keeps the JSON small for little CPU.
                options = MCAPWriteOptions(compression=MCAPCompression.Lz4, compression_threads=0)
                self._writer = foxglove.open_mcap(self._partial, allow_overwrite=True, context=self._context,
                                                  writer_options=options)
            if port is not None:
                self._server = _start_server(host, port, self._context)
        except BaseException:
            self._shutdown_outputs(finished=False)
            raise
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_FRAMES)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="foxglove-sink", daemon=True)
        self._thread.start()
        self.frames = 0

    @property
    def port(self) -> int | None:
        """The live server's port (the real one when 0 was asked for), or None without a server."""
        return self._server.port if self._server is not None else None

    def write(self, frame, result) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((frame, result))
        self.frames += 1

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._shutdown_outputs(finished=True)
        if self._error is not None:
            raise self._error

    def __enter__(self) -> "FoxgloveSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the encoder thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._publish(*item)
                except BaseException as e:  # noqa: BLE001 - handed to the caller's next write()/close()
                    self._error = e

    def _publish(self, frame, result) -> None:
        from foxglove.messages import (Color, CompressedImage, ImageAnnotations, Point2, TextAnnotation,
                                       Timestamp)

        t = int(frame.timestamp_ns)
        stamp = Timestamp(sec=t // 10**9, nsec=t % 10**9)
        self._image.log(CompressedImage(timestamp=stamp, frame_id=self._frame_id, data=self._jpeg_of(frame),
                                        format="jpeg"), log_time=t)
        text = f"{'unknown' if result.unknown else result.label} {result.confidence:.2f}"
        colour = Color(r=1.0, g=0.6, b=0.0, a=1.0) if result.unknown else Color(r=0.2, g=1.0, b=0.2, a=1.0)
        size = max(12.0, frame.image.shape[0] / 20)
        self._annotations.log(ImageAnnotations(texts=[TextAnnotation(
            timestamp=stamp, position=Point2(x=size / 2, y=size * 1.5), text=text, font_size=size,
            text_color=colour, background_color=Color(r=0.0, g=0.0, b=0.0, a=0.6))]), log_time=t)
        self._prediction.log(prediction_message(frame, result), log_time=t)

    def _jpeg_of(self, frame) -> bytes:
        encoded = getattr(frame, "jpeg", None)  # frames that arrived as JPEG (bag sources) keep their bytes
        if encoded is not None:
            return encoded
        ok, jpeg = cv2.imencode(".jpg", frame.image, self._jpeg)
        if not ok:
            raise EdgetuneError(f"Cannot JPEG-encode frame {frame.index} of shape {frame.image.shape}")
        return jpeg.tobytes()

    def _shutdown_outputs(self, *, finished: bool) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
            if finished:
                os.replace(self._partial, self.record)
                logger.info("Recorded %d frames to %s", self.frames, self.record)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self._partial.unlink()


def _start_server(host: str, port: int, context):
    import foxglove

    try:
        return foxglove.start_server(name="edgetune", host=host, port=port, context=context)
    except Exception as e:  # the SDK raises its own error type for a port in use
        raise EdgetuneError(f"Cannot start the Foxglove server on {host}:{port} ({e}): pick another --foxglove-port.") from None


def record_file_predictions(record: Path, results: list[dict[str, Any]], *, seconds_per_image: float) -> int:
    """`predict --record`: each classified file as a frame (stamped with its modification time) and
    its prediction, in input order. Returns the number of frames written."""
    from types import SimpleNamespace

    from toolkit.images import ImageReadError, read_image

    written = 0
    with FoxgloveSink(record=record) as sink:
        for index, r in enumerate(results):
            if "error" in r:
                continue
            path = Path(r["path"])
            try:
                image = cv2.cvtColor(read_image(path), cv2.COLOR_RGB2BGR)
            except ImageReadError as e:  # changed since it was classified
                logger.warning("Not recorded: %s", e)
                continue
            top = [(t["label"], t["probability"]) for t in r["top"]]
            result = SimpleNamespace(label=r["label"], confidence=r["probability"], topk=top,
                                     unknown=bool(r["unknown"]), latency_ms=seconds_per_image * 1e3)
            frame = SimpleNamespace(image=image, timestamp_ns=path.stat().st_mtime_ns, index=index)
            sink.write(frame, result)
            written += 1
    return written
