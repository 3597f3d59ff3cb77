"""evaluate never scores an image the model trained on.

Runs record split.json (every train and val file, by path and sha1); `evaluate RUN DATA` leaves
out training images (same path or same bytes) and reports how many; with no record it only
accepts a layout that marks its own val images. Ends with the ants/bees checks: the class-folder
layout evaluates exactly the run's 49 val images, and predict and evaluate agree on every image
of a 3x-upscaled val set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from tests.test_cli import _one_line_error
from toolkit import atomic
from toolkit.cli import cli
from toolkit.data import SPLIT_FILE, discover, split_record
from toolkit.errors import EdgetuneError
from toolkit.evaluate import evaluation_set
from toolkit.runtime import Predictor


def _predictor(labels, run_dir: Path | None) -> Predictor:
    info = {"run_dir": str(run_dir)} if run_dir else {}
    return Predictor(labels, 32, lambda v: np.zeros((len(v), len(labels)), np.float32), "stub", info=info)


@pytest.fixture
def recorded(tmp_path, make_image_folder):
    """A class-folder dataset and a 'run' whose split.json says how it was split (the default split)."""
    root = make_image_folder(tmp_path, n=10, size=(40, 48))
    splits = discover(root)
    run = tmp_path / "run"
    atomic.write_json(run / SPLIT_FILE, split_record(splits))
    return root, run, splits


def test_class_folders_evaluate_only_the_recorded_val_split(recorded):
    root, run, splits = recorded
    dataset, notes = evaluation_set(_predictor(splits.train.classes, run), root)
    assert [s.path for s in dataset.samples] == [s.path for s in splits.val.samples]
    assert notes == {"training_images_excluded": len(splits.train), "training_images_checked": True}


def test_copies_of_training_images_are_found_by_content(recorded, tmp_path):
    root, run, splits = recorded
    other = tmp_path / "new"
    for i, s in enumerate(splits.train.samples[:3]):  # renamed copies of training images
        (other / splits.train.classes[s.label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.path, other / splits.train.classes[s.label] / f"copy{i}.png")
    for cls in splits.train.classes:
        (other / cls).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(other / cls / "fresh.png"), np.full((40, 48, 3), 7 + len(cls), np.uint8))
    dataset, notes = evaluation_set(_predictor(splits.train.classes, run), other)
    assert notes["training_images_excluded"] == 3
    assert sorted(s.path.name for s in dataset.samples) == ["fresh.png", "fresh.png"]


def test_without_a_record_only_an_explicit_val_split_is_scored(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path, n=6, size=(40, 48))
    classes = discover(root).train.classes
    bare_run = tmp_path / "old_run"
    bare_run.mkdir()
    with pytest.raises(EdgetuneError, match="Cannot tell which images") as e:
        evaluation_set(_predictor(classes, bare_run), root)
    assert "\n" not in str(e.value)
    csv = tmp_path / "split.csv"
    rows = [f"{s.path},{classes[s.label]},{'val' if i % 3 == 0 else 'train'}"
            for i, s in enumerate(discover(root).train.samples)]
    csv.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    dataset, notes = evaluation_set(_predictor(classes, bare_run), csv)
    assert len(dataset) == len(rows[::3]) and notes["training_images_checked"] is False


def test_cli_refuses_training_images_in_one_line(trained_run, tmp_path):
    runner = CliRunner()
    data = Path(json.loads((trained_run / "config.json").read_text())["data"])
    result = runner.invoke(cli, ["evaluate", str(trained_run), str(data / "train")])
    _one_line_error(result, "trained this model")
    old = tmp_path / "old_run"  # a run from before split.json
    shutil.copytree(trained_run, old, ignore=shutil.ignore_patterns("state", SPLIT_FILE))
    _one_line_error(runner.invoke(cli, ["evaluate", str(old), str(data / "train")]), "Cannot tell which images")
    result = runner.invoke(cli, ["evaluate", str(trained_run), str(data), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 8 and metrics["training_images_excluded"] == 0


# ------------------------------------------------------------------------------ real photos


@pytest.fixture(scope="module")
def class_folder_run(hymenoptera, tmp_path_factory):
    """Trained on hymenoptera/train as plain class folders: the default 80/20 split inside it."""
    from toolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("classfolders") / "run"
    train(hymenoptera / "train", out, TrainConfig(backbone="efficientnet_lite0", views=1, epochs=3, workers=2))
    return out


@pytest.mark.integration
def test_evaluate_on_the_training_folder_scores_exactly_the_val_split(class_folder_run, hymenoptera):
    result = CliRunner().invoke(cli, ["evaluate", str(class_folder_run), str(hymenoptera / "train"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    record = json.loads((class_folder_run / SPLIT_FILE).read_text())
    assert len(record["val"]) == 49 and len(record["train"]) == 196
    assert metrics["n"] + metrics["images_skipped"] == 49  # the GIF placeholder may sit in either split
    assert metrics["training_images_excluded"] == 196


@pytest.mark.integration
def test_predict_and_evaluate_agree_on_upscaled_photos(class_folder_run, hymenoptera, tmp_path):
    from toolkit.evaluate import evaluate
    from toolkit.predict import predict_paths
    from toolkit.runtime import load_predictor

    # 3x-upscaled val photos: the sizes where a reduced-resolution JPEG decode used to differ.
    files = []
    for cls in ("ants", "bees"):
        (tmp_path / cls).mkdir()
        for f in sorted((hymenoptera / "val" / cls).glob("*.jpg"))[:40]:
            img = cv2.imread(str(f))
            big = cv2.resize(img, (img.shape[1] * 3, img.shape[0] * 3), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(tmp_path / cls / f.name), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
            files.append(tmp_path / cls / f.name)
    predictor = load_predictor(class_folder_run)
    logits = []
    run = predictor._run
    predictor._run = lambda v: logits.append(run(v)) or logits[-1]
    metrics = evaluate(predictor, tmp_path)
    by_eval = np.concatenate(logits).argmax(1)
    predicted = {r["path"]: r["label"] for r in predict_paths(class_folder_run, files)}
    evaluated = sorted(files, key=lambda p: (p.parent.name, str(p)))  # evaluate's order: label, path
    assert metrics["n"] == len(files) == 80
    assert [predicted[str(p)] for p in evaluated] == [predictor.labels[i] for i in by_eval]
