"""Atomic file writes: a reader (or a Ctrl-C) never sees half a file.

Everything edgetune writes into a run or export directory goes through these helpers: the bytes go
to a temporary file in the same directory, are fsync'ed, then renamed over the target, which POSIX
and Windows both make atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@functools.cache
def _umask() -> int:
    # Read without changing it where Linux allows: os.umask() can only be read by setting it,
    # which races with other threads creating files.
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() would give a new file: temp files are 0600, results must not be."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def write_bytes(path: Path, data: bytes) -> None:
    with open_for_write(path) as f:
        f.write(data)


@contextlib.contextmanager
def open_for_write(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path` through, in pieces (large arrays need no copy in memory);
    it replaces `path` only when the block completes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    # numpy scalars and Paths turn up in metrics and configs; keep json.dumps from choking on them.
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only if the block succeeds.

    A failed or interrupted export therefore leaves nothing behind at `final`. An existing `final`
    is replaced only once the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        tmp.chmod(dir_mode())  # mkdtemp makes it private; the finished directory is meant to be shared
        if final.exists():
            backup = final.with_name(f".{final.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
            os.replace(tmp, final)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
