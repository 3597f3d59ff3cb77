"""The command line as users drive it: exit codes, one-line errors, JSON shapes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from toolkit.cli import cli

FAST = ["--backbone", "efficientnet_lite0", "--views", "1", "--epochs", "3"]


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def trained(runner, tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    return out


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_train_prints_accuracy_devices_and_next_step(runner, tiny_dataset, tmp_path):
    out = tmp_path / "printed"
    result = runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "val accuracy" in result.output
    assert "devices: features on" in result.output
    assert f"edgetune export {out}" in result.output.replace("\n", "")


def test_absent_device_lists_what_is_there(runner, tiny_dataset, tmp_path):
    result = runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--device", "cuda:3"])
    _one_line_error(result, "cuda:3", "Available:", "cpu")
    assert not (tmp_path / "r").exists()


def test_out_of_range_options_are_one_line_errors(runner, tiny_dataset, tmp_path):
    _one_line_error(runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--epochs", "0"]), "--epochs")
    _one_line_error(runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(tmp_path / "r"), "--dropout", "1.5"]), "--dropout")


def test_unwritable_out_is_a_one_line_error(runner, tiny_dataset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(blocker / "run"), *FAST])
    _one_line_error(result, "a_file")


def test_demo_never_replaces_a_real_run(trained, runner):
    before = (trained / "model.safetensors").read_bytes()
    _one_line_error(runner.invoke(cli, ["demo", "--out", str(trained)]), "not a demo")
    assert (trained / "model.safetensors").read_bytes() == before


def test_demo_never_deletes_a_folder_it_did_not_make(runner, tmp_path):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "notes.txt").write_text("precious")
    _one_line_error(runner.invoke(cli, ["demo", "--out", str(victim)]), "not a demo run")
    assert (victim / "sub" / "notes.txt").read_text() == "precious"


def test_bad_seed_aug_or_out_stop_before_anything_is_written(runner, tiny_dataset, tmp_path):
    out = tmp_path / "r"
    _one_line_error(runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(out), "--seed", "-1"]), "--seed")
    _one_line_error(runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(out), "--aug", "rotate.limit=abc"]),
                    "rotate")
    assert not out.exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    _one_line_error(runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(a_file)]), "is a file")
    _one_line_error(runner.invoke(cli, ["augment", str(tiny_dataset), "--out", str(tmp_path / "p.png"), "--seed", "-2"]),
                    "--seed")
    photo = sorted((tiny_dataset / "train" / "red").iterdir())[0]
    before = photo.read_bytes()
    _one_line_error(runner.invoke(cli, ["augment", str(tiny_dataset), "--out", str(photo)]), "inside DATA")
    assert photo.read_bytes() == before  # a preview never replaces a photo it previews


def test_train_errors_are_one_line_exit_2(runner, tmp_path, make_image_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(runner.invoke(cli, ["train", str(empty), "--out", str(tmp_path / "r1")]), str(empty))
    single = make_image_folder(tmp_path, classes=("only",), n=3, name="single")
    _one_line_error(runner.invoke(cli, ["train", str(single), "--out", str(tmp_path / "r2")]), "2 classes")
    _one_line_error(runner.invoke(cli, ["train", str(tmp_path / "nope")]), "nope")
    _one_line_error(runner.invoke(cli, ["train", "--resume", str(tmp_path / "nope")]), "not an edgetune run")
    _one_line_error(runner.invoke(cli, ["train", str(empty), "--aug", "rotate=3"]), "TRANSFORM.SETTING")


def test_train_refuses_to_overwrite_a_run(trained, runner, tiny_dataset):
    result = runner.invoke(cli, ["train", str(tiny_dataset), "--out", str(trained), *FAST])
    _one_line_error(result, "--resume")


def test_evaluate_json(trained, runner, tiny_dataset):
    result = runner.invoke(cli, ["evaluate", str(trained), str(tiny_dataset / "val"), "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n"] == 12 and metrics["accuracy"] >= 0.9
    assert set(metrics["per_class"]) == {"red", "green", "blue"}


def test_evaluate_missing_run_is_a_clear_error(runner, tmp_path, tiny_dataset):
    _one_line_error(runner.invoke(cli, ["evaluate", str(tmp_path), str(tiny_dataset)]), "edgetune train")


def test_corrupt_weights_are_a_one_line_error_naming_the_file(trained, runner, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    result = runner.invoke(cli, ["export", str(broken), "--format", "onnx"])
    _one_line_error(result, "model.safetensors", "retrain")
    assert sorted(p.name for p in broken.iterdir()) == sorted(p.name for p in trained.iterdir()), "nothing written"


def test_predict_files_and_folders_with_bad_files_skipped(trained, runner, tiny_dataset, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"")
    red = next((tiny_dataset / "val" / "red").iterdir())
    result = runner.invoke(cli, ["predict", str(trained), str(red), str(tiny_dataset / "val" / "blue"), str(bad), "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(ln) for ln in result.stdout.splitlines() if ln.startswith("{")]
    assert len(rows) == 1 + 4 + 1
    assert rows[0]["label"] == "red" and 0 <= rows[0]["probability"] <= 1
    assert "error" in rows[-1] and rows[-1]["path"].endswith("broken.jpg")


def test_augment_preview(runner, tiny_dataset, tmp_path):
    out = tmp_path / "preview.png"
    result = runner.invoke(cli, ["augment", str(tiny_dataset), "--out", str(out), "--augment", "strong"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_backbones_json(runner):
    specs = json.loads(runner.invoke(cli, ["backbones", "--json"]).stdout)
    assert {s["name"] for s in specs} >= {"efficientnet_lite0", "efficientnet_lite1"}
    assert all(s["licence"] and s["input_size"] for s in specs)


def test_help_imports_nothing_heavy():
    code = ("import sys; from toolkit.cli import cli; "
            "heavy = [m for m in ('torch', 'openvino', 'onnxruntime', 'nncf', 'cv2') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.parametrize("preset, expected", [(None, "0"), ("1", "1")])
def test_cli_turns_numpy_hugepages_off_unless_the_user_set_it(preset, expected):
    """Huge-page faults made an export's large float32 batches 5x slower on the VMs measured; numpy
    reads the setting once, at import, so the CLI must set it before any command imports numpy."""
    code = ("import os, sys; from toolkit import cli; assert 'numpy' not in sys.modules; "
            "sys.argv = ['edgetune', '--version']\n"
            "try: cli.main()\nexcept SystemExit: pass\n"
            "print(os.environ['NUMPY_MADVISE_HUGEPAGE'])")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if preset is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-1] == expected
