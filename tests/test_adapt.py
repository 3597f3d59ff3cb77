"""Domain adaptation: CORAL folded into the head, and `edgetune adapt`'s bad-input handling."""

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.adapt import coral_map, fold_coral
from toolkit.head_fit import fit_head, head_logits


def test_coral_folded_into_the_head_undoes_a_feature_shift():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 100)
    centres = rng.uniform(0, 2, (3, 20))
    source = centres[y] + rng.normal(0, 0.4, (300, 20))
    # The new camera: channels scaled and offset (a colour cast / low light on the features).
    scale, offset = rng.uniform(0.3, 1.0, 20), rng.uniform(1.5, 3.0, 20)
    target = source * scale + offset
    p = fit_head("logreg", source.astype(np.float32), y, 3)
    before = (head_logits(p, target.astype(np.float32)).argmax(1) == y).mean()
    a, mu_t, mu_s = coral_map(source, target)
    p.tensors = fold_coral(p.tensors, a, mu_t, mu_s)
    after = (head_logits(p, target.astype(np.float32)).argmax(1) == y).mean()
    assert after > before + 0.1 and after > 0.9
    # Still the exported layout: one diagonal scale and one linear layer.
    assert p.tensors["layers.1.weight"].shape == (3, 20) and p.tensors["feature_inv_std"].shape == (20,)


def test_coral_is_identity_without_shift():
    rng = np.random.default_rng(1)
    x = rng.normal(1, 0.5, (200, 10))
    a, mu_t, mu_s = coral_map(x, x)
    np.testing.assert_allclose(a, np.eye(10), atol=1e-6)


@pytest.fixture(scope="module")
def small_run(tiny_dataset, tmp_path_factory):
    from toolkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("adapt") / "run"
    train(tiny_dataset, out, TrainConfig(backbone="efficientnet_lite0", views=1, head="logreg"))
    return out


def test_adapt_writes_a_new_run_that_predicts(small_run, tiny_dataset, tmp_path):
    from toolkit.cli import cli
    from toolkit.evaluate import evaluate
    from toolkit.runs import RunDir
    from toolkit.runtime import load_predictor

    before = (small_run / "model.safetensors").read_bytes()
    out = tmp_path / "adapted"
    result = CliRunner().invoke(cli, ["adapt", str(small_run), str(tiny_dataset / "train"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (small_run / "model.safetensors").read_bytes() == before, "the source run is never modified"
    assert RunDir.open(out).config["adapted"]["methods"] == ["coral"]
    assert evaluate(load_predictor(out), tiny_dataset / "val")["accuracy"] >= 0.9


@pytest.mark.parametrize("case", ["empty", "no_run", "missing_int8"])
def test_adapt_bad_input_is_one_line_and_writes_nothing(case, small_run, tmp_path):
    import shutil

    from toolkit.cli import cli

    run, target = small_run, tmp_path / "target"
    target.mkdir()
    if case == "no_run":
        run = tmp_path / "nothing"
    if case == "missing_int8":
        run = tmp_path / "copy"
        shutil.copytree(small_run, run)
        import json

        cfg = json.loads((run / "config.json").read_text())
        cfg["train"]["backbone_precision"] = "int8"  # a run whose int8 backbone file went missing
        (run / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["adapt", str(run), str(target), "--out", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("out.partial").exists()
