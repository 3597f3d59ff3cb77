"""Datasets: find labelled images (class folders, train/val folders or a CSV) and read them.

Single files are decoded by `toolkit.images`. Training checks every file first (`check_images`,
no pixels kept) and then streams the images (`ImageStream`: decoded on demand, a few at a time),
so memory does not grow with the dataset; `decode_images` decodes and holds a set (evaluation).
Unreadable files become one counted warning instead of a crash mid-training.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import zlib
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from toolkit.errors import DataError, EdgetuneError
from toolkit.images import ImageReadError, check_image, read_image  # noqa: F401 - read_image: public re-export
from toolkit.preprocess import load_image, shrink

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pnm", ".jp2")
VAL_DIR_NAMES = ("val", "valid", "validation")
# Zip archives made on macOS carry this folder; it is never a class.
_IGNORED_DIRS = {"__MACOSX"}
SCAN_WINDOW = 8  # files in flight per worker while checking or decoding a set


# Slotted: a run holds one per image (50,000 images: 2 MB less than with a __dict__ each).
@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    label: int


@dataclass(frozen=True, slots=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class Dataset:
    samples: list[Sample]
    classes: list[str]
    root: Path

    def labels(self) -> np.ndarray:
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels(), minlength=len(self.classes)).astype(np.int64)

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class Splits:
    train: Dataset
    val: Dataset | None
    source: str


# --------------------------------------------------------------------------------------- discovery


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders skipped."""
    files = (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and _visible(p, folder)
    )
    return sorted(files)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in _IGNORED_DIRS
    )


def _find_child(folder: Path, names: Iterable[str]) -> Path | None:
    wanted = {n.lower() for n in names}
    for child in _subdirs(folder):
        if child.name.lower() in wanted:
            return child
    return None


def _read_class_folders(folder: Path, classes: list[str] | None, what: str) -> Dataset:
    """Label DATA/<class>/** images; `classes` fixes the label order (else alphabetical)."""
    dirs = _subdirs(folder)
    if not dirs:
        loose = list_images(folder)
        if loose:
            raise DataError(
                f"Found {len(loose)} images directly in {folder} but no class folders: "
                f"put each class's images in {folder}/<class name>/"
            )
        raise DataError(
            f"No images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}): "
            f"add a folder per class with images in it"
        )
    names = [d.name for d in dirs]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(
                f"Class folder '{unknown[0]}' in {folder} is not one of the model's classes "
                f"({', '.join(classes)}): remove or rename it"
            )
    order = list(classes) if classes is not None else names
    files = {d.name: list_images(d) for d in dirs}
    if not any(files.values()):
        raise DataError(
            f"No images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}): "
            f"add images to the class folders"
        )
    empty = [n for n in names if not files[n]]
    if empty:
        raise DataError(
            f"Class folder '{empty[0]}' in {folder} has no images: add images or remove the folder"
        )
    if classes is None and len(names) < 2:
        raise DataError(
            f"{what} needs at least 2 classes, found 1 ('{names[0]}') in {folder}: "
            f"add a folder per class"
        )
    samples = [Sample(p, order.index(name)) for name in names for p in files[name]]
    samples.sort(key=lambda s: (s.label, str(s.path)))
    return Dataset(samples, order, folder)


def _split_stratified(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Seeded per-class split; each class has its own stream so adding a class moves no others."""
    if not 0.0 < val_fraction < 1.0:
        raise EdgetuneError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    labels = ds.labels()
    train_idx: list[int] = []
    val_idx: list[int] = []
    for label, name in enumerate(ds.classes):
        idx = np.flatnonzero(labels == label)
        if idx.size == 0:
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        idx = rng.permutation(idx)
        n_val = 0 if idx.size < 2 else min(idx.size - 1, max(1, round(idx.size * val_fraction)))
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    pick = lambda ids: [ds.samples[i] for i in sorted(ids)]  # noqa: E731 - keeps label-major order
    train = replace(ds, samples=pick(train_idx))
    if not val_idx:
        logger.warning("No class in %s has 2 or more images, so there is no validation split", ds.root)
        return train, None
    return train, replace(ds, samples=pick(val_idx))


def _missing_classes_warning(val: Dataset) -> None:
    absent = [c for c, n in zip(val.classes, val.class_counts()) if n == 0]
    if absent:
        logger.warning("Validation set %s has no images of: %s", val.root, ", ".join(absent))


def discover(
    source: Path, *, val_fraction: float = 0.2, seed: int = 0, classes: list[str] | None = None
) -> Splits:
    """Find a labelled dataset at `source` and split it into train and val (see module docs)."""
    source = Path(source)
    if not source.exists():
        raise DataError(
            f"Dataset path {source} does not exist: pass a folder of class folders, "
            f"a folder with train/ and val/, or a CSV file with path,label columns"
        )
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source} is a file but not a CSV: pass a folder or a CSV with path,label")
        return _discover_csv(source, val_fraction=val_fraction, seed=seed, classes=classes)
    train_dir = _find_child(source, ["train"])
    val_dir = _find_child(source, VAL_DIR_NAMES)
    if train_dir is not None and val_dir is not None:
        train = _read_class_folders(train_dir, classes, "Training")
        val = _read_class_folders(val_dir, train.classes, "Validation")
        _missing_classes_warning(val)
        return Splits(train, val, "train/val folders")
    if train_dir is not None:
        # DATA/train/<class> without a val folder: split it like plain class folders.
        logger.info("No val/ folder beside %s: splitting %.0f%% off for validation", train_dir, val_fraction * 100)
        source = train_dir
    full = _read_class_folders(source, classes, "Training")
    train, val = _split_stratified(full, val_fraction, seed)
    _missing_classes_warning(val)  # a class of one image keeps it for training
    return Splits(train, val, "class folders (seeded stratified split)")


# --------------------------------------------------------------------------------------------- csv


def _read_csv_rows(csv_path: Path) -> list[tuple[int, Path, str, str | None]]:
    """(row number, resolved path, label, split or None) for each data row."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DataError(
                f"CSV {csv_path} is missing column(s) {', '.join(missing)}: "
                f"the first line must be a header like path,label (optionally ,split)"
            )
        rows = []
        for row_no, row in enumerate(reader, start=2):
            rel = (row[header["path"]] or "").strip()
            label = (row[header["label"]] or "").strip()
            split = (row.get(header["split"]) or "").strip().lower() if "split" in header else None
            if not rel and not label:
                continue
            if not rel or not label:
                raise DataError(f"CSV {csv_path} row {row_no}: empty path or label: fill it in or drop the row")
            path = (csv_path.parent / rel) if not Path(rel).is_absolute() else Path(rel)
            if not path.is_file():
                raise DataError(
                    f"CSV {csv_path} row {row_no}: file '{rel}' not found "
                    f"(paths are relative to {csv_path.parent}): fix the path or remove the row"
                )
            if split is not None and split not in ("train", *VAL_DIR_NAMES):
                raise DataError(
                    f"CSV {csv_path} row {row_no}: split '{split}' is not train or val: fix the split column"
                )
            rows.append((row_no, path, label, split))
    if not rows:
        raise DataError(f"CSV {csv_path} has no data rows: add one row per image (path,label)")
    return rows


def _csv_dataset(csv_path: Path, rows, classes: list[str] | None) -> Dataset:
    names = {label for _, _, label, _ in rows}
    if classes is not None:
        for row_no, _, label, _ in rows:
            if label not in classes:
                raise DataError(
                    f"CSV {csv_path} row {row_no}: label '{label}' is not one of the model's classes "
                    f"({', '.join(classes)})"
                )
        order = list(classes)
    elif all(n.lstrip("-").isdigit() for n in names):
        order = sorted(names, key=int)  # numeric labels: '10' after '9', not after '1'
    else:
        order = sorted(names)
    samples = [Sample(path, order.index(label)) for _, path, label, _ in rows]
    return Dataset(samples, order, csv_path.parent)


def _discover_csv(csv_path: Path, *, val_fraction: float, seed: int, classes: list[str] | None) -> Splits:
    rows = _read_csv_rows(csv_path)
    full = _csv_dataset(csv_path, rows, classes)
    if classes is None and len(full.classes) < 2:
        raise DataError(
            f"Training needs at least 2 classes, found 1 ('{full.classes[0]}') in {csv_path}: "
            f"add rows for another class"
        )
    is_val = [split in VAL_DIR_NAMES for _, _, _, split in rows]
    if any(is_val):
        train = replace(full, samples=[s for s, v in zip(full.samples, is_val) if not v])
        val = replace(full, samples=[s for s, v in zip(full.samples, is_val) if v])
        if not train.samples:
            raise DataError(f"CSV {csv_path} has no rows with split=train: mark some rows as train")
        _missing_classes_warning(val)
        return Splits(train, val, "csv")
    train, val = _split_stratified(full, val_fraction, seed)
    return Splits(train, val, "csv")


def load_eval_set(path: Path, classes: list[str]) -> Dataset:
    """The images to evaluate a trained run on, labelled in the run's class order."""
    return read_eval_layout(path, classes)[0]


def read_eval_layout(path: Path, classes: list[str]) -> tuple[Dataset, bool]:
    """(images to evaluate, whether the layout itself marks them as validation images).

    DATA/train + DATA/val and CSVs with a split column say which images are val (True); plain
    class folders and CSVs without a split do not (False): they may hold training images.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"Evaluation data {path} does not exist: pass DATA/val or a CSV file")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"{path} is a file but not a CSV: pass a folder of class folders or a CSV")
        rows = _read_csv_rows(path)
        explicit = any(split in VAL_DIR_NAMES for *_, split in rows)
        if explicit:
            rows = [r for r in rows if r[3] in VAL_DIR_NAMES]  # a split column: evaluate on val rows
        return _csv_dataset(path, rows, classes), explicit
    explicit = False
    if _find_child(path, ["train"]) is not None:
        val_dir = _find_child(path, VAL_DIR_NAMES)
        if val_dir is not None:
            path, explicit = val_dir, True
    return _read_class_folders(path, classes, "Evaluation"), explicit


# ------------------------------------------------------------------------------ the run's split

SPLIT_FILE = "split.json"  # in a run dir: which files trained it and which validated it
LEARNED_SPLIT_FILE = "learned_split.json"  # in a learned bundle: the files each `learn` step trained on


def files_key(samples) -> str:
    """Fingerprint of the files behind `samples` (path, label, size, mtime): what a features cache
    was extracted from, to tell whether it still describes the files on disk."""
    key = hashlib.sha1()
    for s in samples:
        st = s.path.stat()
        key.update(f"{s.path}|{s.label}|{st.st_size}|{st.st_mtime_ns}".encode())
    return key.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    """sha1 of the file's bytes: recognises a training image copied into another folder."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _in_order(fn: Callable, items: Iterable, workers: int) -> Iterator[Future]:
    """Futures of `fn(item)` in the items' order, run on `workers` threads with at most
    `SCAN_WINDOW` per worker submitted ahead: a future and its work item take about 1.5 KB, so
    submitting all 50,000 files of a set at once held 75 MB (Executor.map does that)."""
    workers = max(1, workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight: deque[Future] = deque()
        for item in items:
            if len(in_flight) == SCAN_WINDOW * workers:
                yield in_flight.popleft()
            in_flight.append(pool.submit(fn, item))
        while in_flight:
            yield in_flight.popleft()


def _digests(paths: Iterable[str | Path], workers: int = 4) -> list[str | None]:
    def one(p: str | Path) -> str | None:
        try:
            return file_digest(p)
        except OSError:
            return None  # unreadable: decoding will skip and report it

    return [future.result() for future in _in_order(one, paths, workers)]


def split_record(splits: Splits) -> dict:
    """What a run stores in split.json: every train and val file, by path and content."""
    def files(ds: Dataset | None) -> list[dict[str, str | None]]:
        if ds is None:
            return []
        paths = [str(s.path.resolve()) for s in ds.samples]
        return [{"path": p, "sha1": d} for p, d in zip(paths, _digests(paths))]

    return {"source": splits.source, "train": files(splits.train), "val": files(splits.val)}


def exclude_training_images(dataset: Dataset, record: dict) -> tuple[Dataset, list[Sample]]:
    """`dataset` without the images that trained the run (same path or same bytes), and those.
    The record's own val files are not read again: their sha1s are in it."""
    train_paths = {f["path"] for f in record.get("train", [])}
    train_digests = {f["sha1"] for f in record.get("train", []) if f.get("sha1")}
    resolved = {id(s): str(s.path.resolve()) for s in dataset.samples}
    candidates = [s for s in dataset.samples if resolved[id(s)] not in train_paths]
    known = {f["path"]: f.get("sha1") for f in record.get("val", [])}
    unknown = [s.path for s in candidates if resolved[id(s)] not in known]
    computed = dict(zip(map(str, unknown), _digests(unknown))) if train_digests else {}
    digests = [known.get(resolved[id(s)], computed.get(str(s.path))) for s in candidates]
    kept = [s for s, d in zip(candidates, digests) if d is None or d not in train_digests]
    kept_ids = {id(s) for s in kept}
    return replace(dataset, samples=kept), [s for s in dataset.samples if id(s) not in kept_ids]


# ---------------------------------------------------------------------------------------- decoding

def _load(path: Path, min_side: int | None) -> np.ndarray:
    img = load_image(path)
    return shrink(img, min_side) if min_side else img


def _display(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.parent).as_posix()
    except ValueError:
        return str(path)


def _scan(dataset: Dataset, read: Callable[[Path], object], workers: int,
          progress: Callable[[int], None] | None) -> tuple[list, Dataset, list[Skipped]]:
    """`read` every sample's file in threads (OpenCV releases the GIL); unreadable files become
    one counted warning. Returns the results of the readable ones, the dataset of those, the rest."""
    results: list = [None] * len(dataset)
    reasons: dict[int, str] = {}
    for i, future in enumerate(_in_order(read, (s.path for s in dataset.samples), workers)):
        try:
            results[i] = future.result()
        except ImageReadError as e:
            reasons[i] = e.reason
        if progress is not None:
            progress(i + 1)
    clean, skipped = without_unreadable(dataset, reasons)
    return [r for i, r in enumerate(results) if i not in reasons], clean, skipped


def warn_skipped(skipped: list[Skipped], total: int, root: Path) -> None:
    """One warning that counts the unreadable files and names the first ten, with their reasons."""
    if not skipped:
        return
    listed = ", ".join(f"{_display(s.path, root)} ({s.reason})" for s in skipped[:10])
    more = f", and {len(skipped) - 10} more" if len(skipped) > 10 else ""
    logger.warning("Skipped %d of %d images that could not be read: %s%s", len(skipped), total, listed, more)


def decode_images(
    dataset: Dataset,
    *,
    min_side: int | None = None,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[np.ndarray], Dataset, list[Skipped]]:
    """Decode every image, shrunk to keep memory small, and hold them all (for a few hundred
    evaluation images; training streams its images through `ImageStream` instead).

    `min_side`: downscale so the shorter side is at most that, by the preprocessing's own resize
    rule (toolkit.preprocess.shrink); with eval_resize_shorter(size) the model views are unchanged.

    Returns the images in dataset order, the dataset without the unreadable samples, and those.
    """
    return _scan(dataset, lambda path: _load(path, min_side), workers, progress)


def check_images(
    dataset: Dataset, *, workers: int = 2, progress: Callable[[int], None] | None = None
) -> tuple[Dataset, list[Skipped]]:
    """Find the unreadable files before training, keeping no pixels (`toolkit.images.check_image`):
    the dataset without them, and them, with the same counted warning as `decode_images`."""
    _, clean, skipped = _scan(dataset, check_image, workers, progress)
    return clean, skipped


def without_unreadable(dataset: Dataset, failed: dict[int, str]) -> tuple[Dataset, list[Skipped]]:
    """`dataset` without the samples at the indices in `failed` (index -> reason), and those, with
    the counted warning and the emptied-class check of `check_images`."""
    skipped = [Skipped(dataset.samples[i].path, r) for i, r in sorted(failed.items())]
    warn_skipped(skipped, len(dataset), dataset.root)
    clean = replace(dataset, samples=[s for i, s in enumerate(dataset.samples) if i not in failed])
    _check_not_emptied(dataset, clean)
    return clean, skipped


class _Slot:
    __slots__ = ("ready", "image", "reason", "error")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.image: np.ndarray | None = None
        self.reason: str | None = None
        self.error: BaseException | None = None


class ImageStream:
    """A dataset's images decoded on demand (shrunk as `decode_images` does), the last `capacity`
    kept: memory stays flat in the number of images. The views of one image are built one after
    another, so a small cache decodes each image once even when two threads need it together.

    `get(i)` is None for a file that cannot be read any more (it passed `check_images`, then
    changed, or only the full decode found the fault); `failed` says which and why.
    """

    def __init__(self, dataset: Dataset, *, min_side: int | None, capacity: int = 8) -> None:
        self.dataset, self.min_side, self.capacity = dataset, min_side, max(1, capacity)
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, _Slot] = OrderedDict()
        self.failed: dict[int, str] = {}
        self.decodes = 0  # files decoded so far: == len(dataset) when no image was decoded twice
        self.peak = 0  # most decoded images the cache held at once

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int) -> np.ndarray | None:
        with self._lock:
            slot = self._cache.get(i)
            owner = slot is None
            if owner:
                slot = self._cache[i] = _Slot()
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)  # a thread still using it keeps its own reference
                self.peak = max(self.peak, len(self._cache))
            else:
                self._cache.move_to_end(i)
        if owner:
            try:
                slot.image = _load(self.dataset.samples[i].path, self.min_side)
            except ImageReadError as e:
                slot.reason = e.reason
            except BaseException as e:  # e.g. MemoryError: threads waiting on this slot raise it too
                slot.error = e
                with self._lock:
                    self._cache.pop(i, None)
                raise
            finally:
                slot.ready.set()
            with self._lock:
                self.decodes += 1
                if slot.reason is not None:
                    self.failed[i] = slot.reason
        else:
            slot.ready.wait()
            if slot.error is not None:
                raise slot.error
        return slot.image


def _check_not_emptied(before: Dataset, after: Dataset) -> None:
    if len(before) and not len(after):
        raise DataError(f"None of the {len(before)} images in {before.root} could be read: see the warning")
    lost = [c for c, b, a in zip(before.classes, before.class_counts(), after.class_counts()) if b and not a]
    if lost:
        raise DataError(
            f"Class '{lost[0]}' in {before.root} has no readable images left: replace its unreadable files"
        )


# ---------------------------------------------------------------------------------------- balance


def class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Inverse-frequency loss weights, mean 1.0 over the classes present; absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)[:n_classes]
    weights = np.zeros(n_classes, dtype=np.float64)
    present = counts > 0
    weights[present] = 1.0 / counts[present]
    if present.any():
        weights[present] /= weights[present].mean()
    return weights.astype(np.float32)


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` sample indices drawn so that every present class is equally likely (with replacement)."""
    labels = np.asarray(labels, dtype=np.int64)
    present = np.unique(labels)
    if present.size == 0:
        raise DataError("Cannot draw balanced samples from an empty dataset")
    picked_class = rng.choice(present, size=n)
    out = np.empty(n, dtype=np.int64)
    for c in present:
        slots = np.flatnonzero(picked_class == c)
        members = np.flatnonzero(labels == c)
        out[slots] = members[rng.integers(0, members.size, size=slots.size)]
    return out
