"""Session fixtures for the exporter and runtime tests: one tiny trained run, each format exported once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import shutil

HYMENOPTERA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "hymenoptera"


def copy_subset(dst: Path, n_train: int = 10, n_val: int = 4) -> Path:
    """A few real ants/bees photos. Real photos matter: flat synthetic colours leave feature
    channels near-constant, whose standardisation (1/std > 65504) no fp16 model can hold."""
    for split, n in (("train", n_train), ("val", n_val)):
        for cls in ("ants", "bees"):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in sorted((HYMENOPTERA / split / cls).iterdir())[:n]:
                shutil.copy(f, dst / split / cls / f.name)
    return dst


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    from toolkit.train import TrainConfig, train

    root = tmp_path_factory.mktemp("exporters")
    data = root / "data"
    copy_subset(data)
    train(data, root / "run", TrainConfig(epochs=3, views=1, workers=2))
    return root / "run"


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """exported(fmt) -> ExportResult, exporting each format at most once per session."""
    from exporters import export

    cache: dict[str, object] = {}
    out = tmp_path_factory.mktemp("bundles")

    def get(fmt: str):
        if fmt not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[fmt] = export(trained_run, fmt, out / fmt)
        return cache[fmt]

    return get
