"""Exporters: one module per edge target, all the same shape, one registry, one verb.

    export(run_dir, "openvino-int8")  ->  <run_dir>/exports/openvino-int8/{model.xml, model.bin, manifest.json}

Each exporter subclasses exporters.base.Exporter (name, runtime, precision, tolerance, build);
`register` adds it here. Export modules import their runtimes lazily, inside `build`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from toolkit.errors import EdgetuneError, unknown_choice

if TYPE_CHECKING:
    from exporters.base import Exporter, ExportResult

EXPORTERS: dict[str, "type[Exporter]"] = {}
_MODULES = ("exporters.onnx_fp32", "exporters.onnx_int8", "exporters.openvino_ir", "exporters.ort_training")


def register(cls):
    """Class decorator: add an Exporter subclass to the registry under its `name`."""
    EXPORTERS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    for module in _MODULES:
        importlib.import_module(module)


def list_formats() -> list[str]:
    _ensure_loaded()
    return sorted(EXPORTERS)


def get_exporter(name: str) -> "type[Exporter]":
    _ensure_loaded()
    if name not in EXPORTERS:
        raise unknown_choice("format", name, EXPORTERS)
    return EXPORTERS[name]


def export(
    run_dir: Path,
    fmt: str,
    out_dir: Path | None = None,
    *,
    calibration: Path | None = None,
    max_drop: float | None = None,
    allow_drop: bool = False,
    static: bool = False,
    fp32: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> "ExportResult":
    """Export the run at `run_dir` as `fmt` into `out_dir` (default <run_dir>/exports/<fmt>).

    The export is checked against the run's classifier on its val images and written atomically:
    on any error nothing is left at `out_dir`. int8 formats must stay within an accuracy budget
    (exporters.parity.Budget: by default 0.5 points, 98% agreement, 5 points per class);
    `max_drop` (percentage points) sets it, `allow_drop` writes an over-budget export anyway.
    """
    from exporters.base import ExportContext
    from toolkit.runs import RunDir

    cls = get_exporter(fmt)
    run = RunDir.open(Path(run_dir))
    if max_drop is not None and max_drop < 0:
        raise EdgetuneError(f"--max-drop must be >= 0 (accuracy points), not {max_drop}.")
    out = Path(out_dir) if out_dir is not None else run.path / "exports" / fmt
    ctx = ExportContext(run, calibration=calibration, max_drop=max_drop, allow_drop=allow_drop, static=static, fp32=fp32,
                        progress=progress or (lambda *_: None))
    return cls(ctx).export(run, out, ctx)


__all__ = ["EXPORTERS", "export", "get_exporter", "list_formats", "register"]
