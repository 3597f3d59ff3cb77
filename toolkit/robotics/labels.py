"""Time-range labels for bag import: a CSV of start,end,label rows, checked before anything is read.

Times are seconds, either bag time (UNIX epoch seconds, as `ros2 bag info` and Foxglove show
them) or seconds from the bag's first message. `auto` takes values of 1e9 and more (2001 onwards)
as bag time and smaller ones as offsets, which a simulated-time bag can override with `start`.
"""

from __future__ import annotations

import bisect
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import EdgetuneError

TIME_BASES = ("auto", "bag", "start")
_EPOCH_THRESHOLD_S = 1e9


class LabelsError(EdgetuneError):
    pass


@dataclass(frozen=True)
class Range:
    start_s: float
    end_s: float
    label: str
    row: int


def check_label_name(name: str, where: str) -> str:
    name = name.strip()
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise LabelsError(f"{where}: label '{name}' cannot be a folder name: use letters, digits, - or _.")
    return name


def _seconds(text: str, path: Path, row: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LabelsError(f"Labels CSV {path} row {row}: {column} '{text}' is not a number of seconds.")
    return value


def read_ranges(path: Path) -> list[Range]:
    """Rows of start,end,label (header optional), sorted by start; overlaps and bad rows raise."""
    path = Path(path)
    if not path.is_file():
        raise LabelsError(f"Labels CSV {path} does not exist: give a CSV with start,end,label rows.")
    ranges: list[Range] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if row_no == 1 and [c.lower() for c in cells[:3]] == ["start", "end", "label"]:
                continue
            if len(cells) != 3:
                raise LabelsError(f"Labels CSV {path} row {row_no}: expected 3 columns start,end,label, got {len(cells)}.")
            start, end = (_seconds(cells[i], path, row_no, col) for i, col in ((0, "start"), (1, "end")))
            if end <= start:
                raise LabelsError(f"Labels CSV {path} row {row_no}: end {cells[1]} is not after start {cells[0]}.")
            label = check_label_name(cells[2], f"Labels CSV {path} row {row_no}")
            ranges.append(Range(start, end, label, row_no))
    if not ranges:
        raise LabelsError(f"Labels CSV {path} has no rows: add start,end,label rows (seconds).")
    ranges.sort(key=lambda r: r.start_s)
    for a, b in zip(ranges, ranges[1:]):
        if b.start_s < a.end_s:
            raise LabelsError(f"Labels CSV {path}: rows {a.row} and {b.row} overlap "
                              f"({a.start_s:g}-{a.end_s:g} and {b.start_s:g}-{b.end_s:g}): make the ranges disjoint.")
    return ranges


class RangeLabeller:
    """Label of a bag timestamp: the range holding it (start inclusive, end exclusive) or None."""

    def __init__(self, ranges: list[Range], bag_start_ns: int, time_base: str = "auto") -> None:
        if time_base not in TIME_BASES:
            raise LabelsError(f"Unknown time base '{time_base}': one of {', '.join(TIME_BASES)}.")
        if time_base == "auto":
            time_base = "bag" if ranges[0].start_s >= _EPOCH_THRESHOLD_S else "start"
        offset = 0 if time_base == "bag" else bag_start_ns
        self.time_base = time_base
        self._starts = [offset + round(r.start_s * 1e9) for r in ranges]
        self._ends = [offset + round(r.end_s * 1e9) for r in ranges]
        self._labels = [r.label for r in ranges]
        self.labels = sorted(set(self._labels))

    def check_overlaps(self, start_ns: int, end_ns: int, where: str) -> None:
        """Fail early (before any image is written) when no range meets the bag's time span."""
        if not any(s <= end_ns and e > start_ns for s, e in zip(self._starts, self._ends)):
            raise LabelsError(
                f"No --labels range meets {where}, which spans {start_ns / 1e9:.3f}-{end_ns / 1e9:.3f} s bag time "
                f"(0-{(end_ns - start_ns) / 1e9:.3f} s from its start); ranges were read as "
                f"{'bag time' if self.time_base == 'bag' else 'seconds from the start'} (see --time-base).")

    def __call__(self, timestamp_ns: int) -> str | None:
        i = bisect.bisect_right(self._starts, timestamp_ns) - 1
        if i >= 0 and timestamp_ns < self._ends[i]:
            return self._labels[i]
        return None
