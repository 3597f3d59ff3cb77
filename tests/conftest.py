"""Shared fixtures: small synthetic image datasets written with OpenCV."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import pytest

# Distinct BGR base colours so a class is recognisable from its pixels alone.
_PALETTE = [(40, 40, 220), (40, 200, 40), (220, 60, 40), (30, 200, 230), (200, 40, 200), (200, 200, 40)]


def synthetic_image(class_index: int, image_index: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """HxWx3 uint8 BGR: the class colour plus a per-image gradient and a square, so images differ."""
    h, w = size
    base = np.array(_PALETTE[class_index % len(_PALETTE)], dtype=np.float32)
    ramp = np.linspace(-25, 25, w, dtype=np.float32)[None, :, None]
    img = np.clip(base + ramp + 3 * image_index, 0, 255).astype(np.uint8).repeat(h, axis=0)
    s = max(2, min(h, w) // 4)
    y, x = (image_index * 7) % (h - s), (image_index * 11) % (w - s)
    img[y : y + s, x : x + s] = 255 - base.astype(np.uint8)
    return img


def write_class_folder(root: Path, classes: Sequence[str], n: int, size: tuple[int, int], reshot: bool = False) -> Path:
    """n images per class. reshot=True (val folders): the same scenes one grey level brighter, so
    no val file is byte-identical to a training file (evaluate rightly refuses to score those)."""
    for ci, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = ".jpg" if i % 2 == 0 else ".png"  # both codecs in every dataset
            img = synthetic_image(ci, i, size)
            cv2.imwrite(str(folder / f"{name}_{i:03d}{ext}"), cv2.add(img, 1) if reshot else img)
    return root


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """Factory: make_image_folder(tmp_path, classes=("cats", "dogs"), n=6, size=(48, 64), val_n=0).

    Writes ROOT/<class>/<class>_000.jpg, _001.png, ... (ROOT = tmp_path/name); with val_n > 0 it
    writes ROOT/train/<class>/ (n each) and ROOT/val/<class>/ (val_n each) instead. Returns ROOT.
    """

    def make(tmp_path: Path, classes: Sequence[str] = ("cats", "dogs"), n: int = 6,
             size: tuple[int, int] = (48, 64), val_n: int = 0, name: str = "data") -> Path:
        root = Path(tmp_path) / name
        if val_n:
            write_class_folder(root / "train", classes, n, size)
            write_class_folder(root / "val", classes, val_n, size, reshot=True)
        else:
            write_class_folder(root, classes, n, size)
        return root

    return make


# The real small dataset lives beside the repository, never inside it.
HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip(f"real dataset not found at {HYMENOPTERA} (needs ../shared beside the repo)")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """train/val class folders of three colour classes, big enough for a 224+ px backbone."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    write_class_folder(root / "train", ("red", "green", "blue"), 8, (96, 128))
    write_class_folder(root / "val", ("red", "green", "blue"), 4, (96, 128), reshot=True)
    return root


def onnxruntime_ops(model, tmp_path: Path) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually runs (after its QDQ fusions) for an ONNX model
    (a ModelProto or a path): QLinearConv where it computes in int8, Conv where in float."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def copy_subset(source: Path, dst: Path, n_train: int = 10, n_val: int = 4) -> Path:
    """A few real ants/bees photos. Real photos matter: flat synthetic colours leave feature
    channels near-constant, whose standardisation (1/std > 65504) no fp16 model can hold."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("ants", "bees"):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((source / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / split / cls / f.name)
    return dst


@pytest.fixture(scope="session")
def trained_run(hymenoptera, tmp_path_factory) -> Path:
    """One small run on real photos, shared by the exporter and runtime tests."""
    from toolkit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("exporters")
    data = root / "data"
    copy_subset(hymenoptera, data)
    train(data, root / "run", TrainConfig(epochs=3, views=1, workers=2))
    return root / "run"


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """exported(fmt) -> ExportResult, exporting each format at most once per session."""
    from exporters import export, get_exporter

    cache: dict[str, object] = {}
    out = tmp_path_factory.mktemp("bundles")

    def get(fmt: str):
        if fmt not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # 8 val images: one flip is 12.5 points. The contract is about files and outputs;
                # int8 accuracy budgets are tested in test_int8.py and measured by bench_int8.py.
                wide = {"max_drop": 100.0} if get_exporter(fmt).tolerance is None else {}
                cache[fmt] = export(trained_run, fmt, out / fmt, **wide)
        return cache[fmt]

    return get


def int8_layout(model) -> tuple[set[str], bool, bool]:
    """(op types an int8 FakeQuantize feeds, whether every depthwise convolution's weights are stored
    as int8 constants, whether the leading convolutions read float inputs) of an openvino.Model: what
    edgetune's int8 recipe promises about a file."""
    from toolkit.features import LEADING_CONVOLUTIONS, leading_convolutions

    def stored_int8(node) -> bool:
        if node.get_type_name() == "Constant":
            return node.get_element_type().get_type_name() == "i8"
        return node.get_type_name() in ("Convert", "Multiply") and any(
            stored_int8(v.get_node()) for v in node.input_values())

    ops = model.get_ordered_ops()
    fed = {t.get_node().get_type_name() for op in ops if op.get_type_name() == "FakeQuantize"
           for t in op.output(0).get_target_inputs()}
    depthwise = [op for op in ops if op.get_type_name() == "GroupConvolution"]
    leading = set(leading_convolutions(model))
    leading_float = len(leading) == LEADING_CONVOLUTIONS > 0 and all(
        op.input_value(0).get_node().get_type_name() != "FakeQuantize"
        for op in ops if op.get_friendly_name() in leading)
    return fed, bool(depthwise) and all(stored_int8(op.input_value(1).get_node()) for op in depthwise), leading_float
