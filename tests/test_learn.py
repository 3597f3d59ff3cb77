"""`edgetune learn` on exported bundles: new class, forget, bad input (old bundle never touched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.cli import cli

from .conftest import synthetic_image


def _new_class(root: Path, name: str = "stripes", n: int = 10) -> Path:
    for i in range(n):
        img = synthetic_image(4, i, (160, 200))
        img[::8] = 0  # a pattern no ant or bee photo has
        (root / name).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / name / f"{name}_{i:02d}.jpg"), img)
    return root


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("fmt", ["onnx", "openvino-int8"])
def test_learn_adds_a_class_and_keeps_the_old_bundle(fmt, exported, tmp_path):
    import toolkit
    from toolkit.learn import learn

    bundle = exported(fmt).out_dir
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["feature_memory"]["counts"] == {"ants": 10, "bees": 10}
    assert manifest["calibration"]["temperature"] > 0 and set(manifest["sha256"]) >= {manifest["model"]}
    before = _snapshot(bundle)
    result = learn(bundle, _new_class(tmp_path / "data"), tmp_path / "new")
    assert _snapshot(bundle) == before
    new = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert new["labels"] == ["ants", "bees", "stripes"] and new["learned"]["added"] == ["stripes"]
    assert new["feature_memory"]["counts"]["stripes"] == 8 and new["format"] == manifest["format"]
    assert result.verification["agreement"] == 1.0
    if manifest["precision"] == "int8":  # the refit head stays compressed as export stored it
        size = {b: sum(f.stat().st_size for f in b.iterdir() if f.name.startswith("model."))
                for b in (bundle, tmp_path / "new")}
        assert size[tmp_path / "new"] < 1.05 * size[bundle], size
    # The bundle names the head its model carries (head selection's choice), and learn refits that recipe.
    from toolkit.runs import RunDir

    selected = RunDir(manifest["source_run"]).config.get("head_selection", {}).get("selected")
    assert manifest["head"] == (selected or manifest["head"]) and "head_options" in manifest
    from toolkit.head_fit import HEADS

    assert manifest["head"] in HEADS
    assert new["head"] == manifest["head"] and "head recipe" in result.head_note
    assert new["head_options"] == result.to_json()["head_options"]
    row = {r["class"]: r for r in result.table}["stripes"]
    assert row["new"] and row["n"] == 2 and row["after"] == 1.0
    clf = toolkit.load(tmp_path / "new")
    img = synthetic_image(4, 3, (160, 200))
    img[::8] = 0
    assert clf.classify(img).label == "stripes"
    # Learning again from the learned bundle: memory carries the new class; --forget drops one.
    again = learn(tmp_path / "new", _new_class(tmp_path / "more", "stripes", 4), tmp_path / "forgot", forget=("bees",))
    assert again.labels == ["ants", "stripes"]


def test_learn_bad_input_one_line_exit_2(exported, tmp_path):
    bundle = exported("onnx").out_dir
    data = _new_class(tmp_path / "data", n=4)
    runner = CliRunner()

    def run(*args):
        r = runner.invoke(cli, ["learn", *map(str, args)])
        assert r.exit_code == 2, r.output
        return r.output

    assert "is the input bundle" in run(bundle, data, "--out", bundle)
    assert "no folder" in run(bundle, data, "--out", tmp_path / "o1", "--replace-class", "ants")
    assert "Unknown class 'wasps'" in run(bundle, data, "--out", tmp_path / "o2", "--forget", "wasps")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    model = broken / json.loads((broken / "manifest.json").read_text())["model"]
    model.write_bytes(model.read_bytes()[:-10] + b"0123456789")
    assert "does not match its manifest" in run(broken, data, "--out", tmp_path / "o3")
    model.unlink()
    assert "is missing" in run(broken, data, "--out", tmp_path / "o4")
    future = tmp_path / "future"
    shutil.copytree(bundle, future)
    m = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**m, "bundle_version": 99}))
    assert "bundle_version 99" in run(future, data, "--out", tmp_path / "o5")
    bad = tmp_path / "unreadable" / "wasps"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"w{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = run(bundle, bad.parent, "--out", tmp_path / "o6")
    assert "wasps" in out or "could be read" in out
    damaged = tmp_path / "damaged"
    shutil.copytree(bundle, damaged)
    memory = damaged / "features.npz"
    memory.write_bytes(memory.read_bytes()[: memory.stat().st_size // 2])
    assert "is damaged" in run(damaged, data, "--out", tmp_path / "o9")
    # Forgetting every old class beside one new one would leave a one-class "classifier".
    assert "at least 2 classes" in run(bundle, data, "--out", tmp_path / "o7", "--forget", "ants", "--forget", "bees")
    assert "--seed" in run(bundle, data, "--out", tmp_path / "o8", "--seed", "-1")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 10))


def test_learn_refits_an_mlp_bundles_own_recipe_without_torch():
    """An MLP bundle (ants/bees' default head) keeps its recipe on a robot that has no torch."""
    from .test_robot import stdout_without_torch

    out = stdout_without_torch(
        "from toolkit.learn import _choose_head\n"
        "name, options, _, note = _choose_head('mlp', x, y, 3, 0)\n"
        "print(name, 'head recipe' in note, 'torch' in sys.modules)\n")
    assert out.split()[-3:] == ["mlp", "True", "False"]


def test_learn_on_a_camera_corrected_bundle_corrects_the_new_images(exported, tmp_path):
    """A bundle of a run adapted to a new camera corrects that camera's frames (manifest
    preprocessing.camera_correction): images `learn` is given come from the same camera, so their
    features in the new memory are those of the corrected images, and the new bundle keeps the table."""
    from toolkit.camera import Camera
    from toolkit.learn import learn
    from toolkit.preprocess import correction_record

    dark = Camera(gamma=2.0, level=0.35, tint2=0.7)
    plain = exported("onnx").out_dir
    corrected = tmp_path / "corrected"
    shutil.copytree(plain, corrected)
    manifest = json.loads((corrected / "manifest.json").read_text())
    manifest["preprocessing"]["camera_correction"] = correction_record(dark.correction_lut(), dark.describe())
    (corrected / "manifest.json").write_text(json.dumps(manifest))
    bright, darker = _new_class(tmp_path / "bright"), _new_class(tmp_path / "dark")
    for f in sorted((darker / "stripes").iterdir()):  # RGB order for the camera, as the preprocessing reads it
        cv2.imwrite(str(f.with_suffix(".png")), dark.render(cv2.imread(str(f))[..., ::-1])[..., ::-1])
        f.unlink()

    def stripes_memory(bundle, data, out):
        learn(bundle, data, tmp_path / out)
        new = json.loads((tmp_path / out / "manifest.json").read_text())
        with np.load(tmp_path / out / new["feature_memory"]["file"]) as d:
            return new, d["features"][d["labels"] == new["labels"].index("stripes")].astype(np.float64)

    new, undone = stripes_memory(corrected, darker, "undone")
    assert new["preprocessing"]["camera_correction"] == manifest["preprocessing"]["camera_correction"]
    _, reference = stripes_memory(plain, bright, "reference")
    _, unseen = stripes_memory(plain, darker, "unseen")
    # The same 8 images (file names, so the split, are the same) in the same order: cosine gap per image.
    gap = lambda a: float(np.mean(1 - (a * reference).sum(1) / np.linalg.norm(a, axis=1)  # noqa: E731
                                  / np.linalg.norm(reference, axis=1)))
    assert gap(undone) < 0.5 * gap(unseen), (gap(undone), gap(unseen))


def test_a_logreg_bundle_adds_the_few_shot_rule_for_a_three_photo_class_then_returns_to_its_recipe(
        hymenoptera, tmp_path):
    """Every bundle's memory carries the backbone's ImageNet classifier; a new class of 3 images on
    a logistic-regression bundle gets logreg plus the few-shot rule (one exported head, verified,
    calibrated on out-of-fold logits), and once the class has more images the recipe alone returns."""
    from exporters import export
    from exporters.bundle import decode_memory
    from toolkit.backbones import get_spec
    from toolkit.features import imagenet_prior
    from toolkit.learn import learn
    from toolkit.selection import prior_rule_weight
    from toolkit.train import TrainConfig, train

    from .conftest import copy_subset

    data = copy_subset(hymenoptera, tmp_path / "data")
    train(data, tmp_path / "run", TrainConfig(head="logreg", views=0, workers=2))
    bundle = export(tmp_path / "run", "onnx", tmp_path / "bundle").out_dir
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["head"] == "logreg"
    _, _, prior = decode_memory(bundle / manifest["feature_memory"]["file"])
    expected = imagenet_prior(get_spec(manifest["backbone"]["name"]))
    assert prior is not None and np.allclose(prior.weight, expected.weight, atol=1e-3)

    few = learn(bundle, _new_class(tmp_path / "few", n=4), tmp_path / "b2")  # 3 to fit, 1 held out
    new = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert new["head"] == "logreg+prior" and new["head_options"]["prior_weight"] == prior_rule_weight(3)
    assert "few-shot rule" in few.head_note and new["learned"]["recipe"] == "logreg"
    assert few.verification["agreement"] == 1.0 and new["calibration"]["temperature"] > 0
    learn(tmp_path / "b2", _new_class(tmp_path / "more", n=10), tmp_path / "b3")
    assert json.loads((tmp_path / "b3" / "manifest.json").read_text())["head"] == "logreg"


def test_evaluate_never_scores_what_learn_trained_on(exported, tmp_path):
    from toolkit.evaluate import evaluate
    from toolkit.learn import learn
    from toolkit.runtime import load_predictor

    data = _new_class(tmp_path / "data")  # 10 photos: learn trains on 8, holds 2 out
    learn(exported("onnx").out_dir, data, tmp_path / "new")
    metrics = evaluate(load_predictor(tmp_path / "new"), data)
    assert metrics["training_images_excluded"] == 8 and metrics["n"] == 2


def test_evaluate_refuses_a_bundle_whose_source_run_was_replaced(exported, tmp_path):
    from toolkit.evaluate import evaluate
    from toolkit.runtime import load_predictor

    bundle = tmp_path / "b"
    shutil.copytree(exported("onnx").out_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    data = tmp_path / "photos"  # class folders (no val split of their own) of the run's val photos
    shutil.copytree(Path(manifest["source_run"]).parent / "data" / "val", data)
    assert evaluate(load_predictor(bundle), data)["training_images_checked"]
    # A run retrained at the same path has another split.json: its record says nothing of this model.
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "source_split_sha256": "0" * 64}))
    with pytest.raises(Exception, match="not the one this bundle was exported from"):
        evaluate(load_predictor(bundle), data)


def test_learn_leaves_out_training_artifacts_of_the_old_head(exported, tmp_path):
    from toolkit.learn import learn
    from toolkit.runtime import load_predictor

    bundle = exported("ort-training").out_dir
    artifacts = json.loads((bundle / "manifest.json").read_text())["training"]["artifacts"]
    learn(bundle, _new_class(tmp_path / "data", n=6), tmp_path / "new")
    new = json.loads((tmp_path / "new" / "manifest.json").read_text())
    assert new["format"] == "onnx" and "training" not in new and new["labels"][-1] == "stripes"
    assert not any((tmp_path / "new" / name).exists() for name in artifacts)
    assert load_predictor(tmp_path / "new").predict(np.zeros((1, 240, 240, 3), np.uint8)).shape == (1, 3)
