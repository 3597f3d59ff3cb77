"""Training: the run directory, determinism, resume after Ctrl-C, and the torch unfreeze path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from toolkit.errors import DataError, EdgetuneError
from toolkit.runs import RunDir
from toolkit.train import TrainConfig, train

FAST = dict(backbone="efficientnet_lite0", views=1, epochs=4, patience=4, workers=2)


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    metrics = train(tiny_dataset, out, TrainConfig(**FAST))
    return out, metrics


def test_run_directory_has_everything_later_steps_need(run):
    out, metrics = run
    for name in ("config.json", "labels.json", "model.safetensors", "metrics.json", "history.csv", "report.png"):
        assert (out / name).is_file(), name
    for key in ("val_accuracy", "val_loss", "best_epoch", "train_seconds", "images_skipped"):
        assert key in metrics
    assert json.loads((out / "labels.json").read_text()) == ["blue", "green", "red"]
    assert metrics["val_accuracy"] >= 0.9, "three flat colours must be trivially separable"
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_weights_are_safetensors_never_pickle(run):
    out, _ = run
    head = open(out / "model.safetensors", "rb").read(8)
    assert int.from_bytes(head, "little") < 10_000_000  # safetensors starts with its header length
    state = RunDir.open(out).model_state()
    assert {"head.layers.1.weight", "head.layers.1.bias", "head.feature_mean"} <= set(state)


def test_same_seed_same_metrics(run, tiny_dataset, tmp_path):
    _, metrics = run
    again = train(tiny_dataset, tmp_path / "again", TrainConfig(**FAST))
    for key in ("val_accuracy", "val_loss", "best_epoch", "epochs_run"):
        assert again[key] == metrics[key]


def test_interrupted_run_resumes_to_the_same_result(run, tiny_dataset, tmp_path):
    _, metrics = run
    out = tmp_path / "interrupted"

    def ctrl_c_once_features_are_cached(stage, done, total):
        if stage == "head selection" and done == 0:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_dataset, out, TrainConfig(**FAST), progress=ctrl_c_once_features_are_cached)
    assert not (out / "model.safetensors").exists()
    with pytest.raises(EdgetuneError, match="resume"):
        RunDir.open(out)
    resumed = train(None, out, resume=True)
    for key in ("val_accuracy", "val_loss", "best_epoch", "epochs_run"):
        assert resumed[key] == metrics[key]
    reference = RunDir.open(run[0]).model_state()
    for key, value in RunDir.open(out).model_state().items():
        np.testing.assert_array_equal(value, reference[key])


def test_existing_run_is_never_overwritten(run, tiny_dataset):
    out, _ = run
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(EdgetuneError, match="already holds a run"):
        train(tiny_dataset, out, TrainConfig(**FAST))
    assert (out / "model.safetensors").read_bytes() == before


def test_classifier_matches_head_on_features(run):
    """The exported source model (backbone + head) gives the predictions training measured."""
    import torch

    from toolkit.augment import eval_view
    from toolkit.data import decode_images, load_eval_set

    out, metrics = run
    r = RunDir.open(out)
    ds = load_eval_set(r.config["data"], r.labels)
    images, ds, _ = decode_images(ds, min_side=256)
    x = np.stack([eval_view(im, r.spec.input_size) for im in images]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        pred = r.build_classifier()(torch.from_numpy(x.astype(np.float32))).argmax(1).numpy()
    assert np.mean(pred == ds.labels()) == pytest.approx(metrics["val_accuracy"], abs=0.1)


@pytest.mark.parametrize("extra", [{"head": "mlp", "mixup": 0.0}, {"head": "logreg", "views": 0}])
def test_forced_head_trains_and_exports_its_layout(extra, tiny_dataset, tmp_path):
    out = tmp_path / "opt"
    metrics = train(tiny_dataset, out, TrainConfig(**{**FAST, **extra}))
    assert metrics["head"]["selected"] == extra["head"] and metrics["val_accuracy"] >= 0.9
    cfg = RunDir.open(out).config
    assert cfg["train"]["head"] == ("mlp" if extra["head"] == "mlp" else "linear")
    assert cfg["head_selection"]["requested"] == extra["head"]
    RunDir.open(out).build_classifier()  # the exporters' source model loads the fitted tensors


def test_auto_head_is_chosen_by_cv_and_reported(run):
    out, metrics = run
    assert metrics["head"]["requested"] == "auto"
    cv = metrics["cv_accuracy"]
    assert set(cv) >= {"mean", "std", "folds"} and 0 <= cv["mean"] <= 1
    heads = {row["head"] for row in metrics["cv_table"]}
    assert {"logreg", "prototypes", "linear", "mlp"} <= heads
    assert metrics["cv_table"][0]["accuracy"] == cv["mean"]
    assert "accuracy" in (out / "history.csv").read_text().splitlines()[0]


def test_one_shot_falls_back_to_a_rule(tiny_dataset, tmp_path):
    metrics = train(tiny_dataset, tmp_path / "one", TrainConfig(**{**FAST, "shots": 1}))
    assert metrics["n_train"] == 3 and metrics["cv_accuracy"] is None
    assert "too few to cross-validate" in metrics["head"]["reason"]


def test_a_few_shot_runs_bundle_remembers_only_its_shots(tiny_dataset, tmp_path):
    """A --shots K run's bundle keeps, for `learn`, the K images per class the head learnt from (not
    every image of the folder), and calibrates the head it ships (the rule's own weight)."""
    import json
    import warnings

    from exporters import export

    metrics = train(tiny_dataset, tmp_path / "two", TrainConfig(**{**FAST, "shots": 2}))
    assert metrics["n_train"] == 6 and metrics["head"]["selected"] == "prior"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export(tmp_path / "two", "onnx", tmp_path / "bundle")
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["feature_memory"]["counts"] == {"red": 2, "green": 2, "blue": 2}
    assert f"prior(weight={metrics['head']['options']['weight']})" in manifest["calibration"]["source"]


@pytest.mark.parametrize("shots, match", [(0, "at least 1"), (10_000, "more than the")])
def test_bad_shots_write_nothing(shots, match, tiny_dataset, tmp_path):
    with pytest.raises(EdgetuneError, match=match):
        train(tiny_dataset, tmp_path / "shots", TrainConfig(**{**FAST, "shots": shots}))
    assert not (tmp_path / "shots").exists()


def test_unfreezing_trains_the_tail_in_torch(tiny_dataset, tmp_path):
    out = tmp_path / "unfrozen"
    metrics = train(tiny_dataset, out, TrainConfig(**{**FAST, "head": "linear", "unfreeze": 1, "epochs": 1,
                                                      "batch_size": 8}))
    state = RunDir.open(out).model_state()
    assert any(k.startswith("backbone._blocks.15.") for k in state)
    assert metrics["unfrozen_blocks"] == 1


def test_bad_config_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(EdgetuneError, match="balance"):
        train(tiny_dataset, tmp_path / "x", TrainConfig(balance="sometimes"))
    with pytest.raises(EdgetuneError, match="Unknown backbone"):
        train(tiny_dataset, tmp_path / "y", TrainConfig(backbone="resnet9000"))


def test_single_class_is_a_data_error(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path, classes=("only",), n=4)
    with pytest.raises(DataError, match="at least 2 classes"):
        train(data, tmp_path / "run", TrainConfig(**FAST))


def test_int8_backbone_run_keeps_the_backbone_it_learned_on(tiny_dataset, tmp_path):
    from toolkit.learners import INT8_BACKBONE
    from toolkit.runtime import load_predictor

    out = tmp_path / "int8"
    metrics = train(tiny_dataset, out, TrainConfig(**{**FAST, "backbone_precision": "int8"}))
    assert (out / INT8_BACKBONE).is_file() and (out / INT8_BACKBONE).with_suffix(".bin").is_file()
    assert "int8" in metrics["feature_engine"]
    predictor = load_predictor(out)
    assert "int8" in predictor.describe()


@pytest.mark.parametrize("device", ["cpu", "ort:CPUExecutionProvider"])
def test_run_dir_runs_on_torch_and_onnxruntime(run, device):
    from toolkit.evaluate import evaluate
    from toolkit.runtime import load_predictor

    out, metrics = run
    r = RunDir.open(out)
    result = evaluate(load_predictor(out, device=device), Path(r.config["data"]) / "val")
    assert result["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=0.1)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA GPU (CI has none)")
def test_cuda_path_end_to_end(tiny_dataset, tmp_path):
    """On a GPU machine: backbone features and head both on CUDA, then predict on CUDA."""
    from toolkit.runtime import load_predictor

    out = tmp_path / "cuda"
    metrics = train(tiny_dataset, out, TrainConfig(**{**FAST, "device": "cuda"}))
    assert "cuda" in metrics["devices"] and metrics["val_accuracy"] >= 0.9
    assert "torch:cuda" in load_predictor(out, device="cuda").describe()


@pytest.mark.parametrize("found_by", ["check", "decode"])
def test_images_are_streamed_and_bad_files_counted(found_by, make_image_folder, tmp_path, monkeypatch):
    """Training decodes images as their views are built, a bounded few at a time (never all of
    them), each once for all its views; unreadable files are skipped, counted and listed, whether
    the up-front check finds them or only the full decode while streaming does."""
    from toolkit import data, learners

    root = make_image_folder(tmp_path, classes=("red", "green", "blue"), n=16, size=(96, 128), val_n=4)
    (root / "train" / "red" / "notes.jpg").write_bytes(b"shopping list")
    (root / "val" / "blue" / "empty.png").write_bytes(b"")
    streams = []

    class Recorded(data.ImageStream):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            streams.append(self)

    def small_batches(*args, **kwargs):  # the cache's size follows the batch, which is tuned per machine
        engine = engine_for(*args, **kwargs)
        engine.batch = 4
        return engine

    engine_for = learners.engine_for
    monkeypatch.setattr(learners, "engine_for", small_batches)
    monkeypatch.setattr(data, "ImageStream", Recorded)
    if found_by == "decode":
        monkeypatch.setattr(data, "check_image", lambda path: None)
    out = tmp_path / "run"
    metrics = train(root, out, TrainConfig(**{**FAST, "views": 2, "head": "logreg"}))
    assert metrics["images_skipped"] == 2 and metrics["n_train"] == 48 and metrics["n_val"] == 12
    assert {Path(s["path"]).name for s in metrics["skipped"]} == {"notes.jpg", "empty.png"}
    streamed = 49 if found_by == "decode" else 48  # the checked files
    train_stream = next(s for s in streams if len(s) == streamed)
    assert train_stream.peak <= train_stream.capacity < streamed and train_stream.decodes == streamed
    train_feats, labels = learners.cached_train_features(RunDir.open(out))
    assert train_feats.shape[:2] == (48, 3) and len(labels) == 48
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == 49  # the run's files, readable or not: evaluate must recognise them
    if found_by == "decode":  # a resumed run reads the same drops back from the feature cache
        (out / "model.safetensors").unlink()
        resumed = train(None, out, resume=True)
        assert resumed["images_skipped"] == 2 and resumed["n_train"] == 48


def test_val_copies_of_training_images_are_left_out_and_recorded(tmp_path, make_image_folder, caplog):
    import shutil

    data = make_image_folder(tmp_path, n=6, val_n=3, size=(96, 128))
    cats = sorted((data / "train" / "cats").iterdir())
    shutil.copy(cats[0], data / "val" / "cats" / "copy.jpg")  # a photo filed in both splits
    shutil.copy(cats[1], data / "train" / "dogs" / "dup.jpg")  # and one under two classes
    metrics = train(data, tmp_path / "run", TrainConfig(backbone="efficientnet_lite0", epochs=3, views=1))
    assert metrics["val_copies_of_train"] == 1 and metrics["n_val"] == 6
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert [Path(p).name for p in split["val_copies_of_train"]] == ["copy.jpg"]
    assert "copy.jpg" not in {Path(f["path"]).name for f in split["val"]}
    assert "copies of training images" in caplog.text and "two classes" in caplog.text

    only_copies = tmp_path / "only_copies"
    shutil.copytree(data / "train", only_copies / "train")
    shutil.copytree(data / "train", only_copies / "val")
    with pytest.raises(EdgetuneError, match="copy of a training image"):
        train(only_copies, tmp_path / "run2", TrainConfig(backbone="efficientnet_lite0", epochs=3, views=1))
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("options", [{"views": 2.5}, {"epochs": "30"}, {"seed": True}, {"shots": "5"},
                                     {"augment_overrides": ["rotate.limit=10"]}])
def test_wrongly_typed_options_stop_before_anything_is_written(options, tiny_dataset, tmp_path):
    with pytest.raises(EdgetuneError, match=f"TrainConfig.{next(iter(options))} must be"):
        train(tiny_dataset, tmp_path / "run", TrainConfig(**options))
    assert not (tmp_path / "run").exists()
