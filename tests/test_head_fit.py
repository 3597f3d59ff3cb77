"""Head fitting and cross-validation on small synthetic features (fast, torch-free where it says so)."""

import subprocess
import sys

import numpy as np
import pytest

from toolkit.head_fit import HEADS, cross_validate, cv_folds, fit_head, head_logits, model_tensors


def blobs(n_per_class=12, n_classes=3, d=16, views=1, seed=0, spread=1.0):
    """ReLU6-like nonnegative class clusters, with `views` jittered copies per image."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 3, (n_classes, d))
    y = np.repeat(np.arange(n_classes), n_per_class)
    base = centres[y] + rng.normal(0, spread, (len(y), d))
    x = np.stack([base + rng.normal(0, 0.2, base.shape) for _ in range(views)], axis=1)
    return np.clip(x, 0, 6).astype(np.float32).squeeze(1) if views == 1 else np.clip(x, 0, 6).astype(np.float32), y


@pytest.mark.parametrize("name", ["prototypes", "imprint", "logreg", "mlp"])
def test_heads_fit_and_predict(name):
    x, y = blobs()
    xt, yt = blobs(seed=0)  # same centres: the head must separate them
    p = fit_head(name, x, y, 3)
    assert p.kind == HEADS[name].kind and p.name == name
    assert (head_logits(p, xt).argmax(1) == yt).mean() > 0.9


def test_tensors_use_the_exported_state_dict_names():
    x, y = blobs()
    p = fit_head("logreg", x, y, 3, C=0.1)
    assert set(p.tensors) == {"feature_mean", "feature_inv_std", "layers.1.weight", "layers.1.bias"}
    assert p.tensors["layers.1.weight"].shape == (3, 16)
    # The torch head the exporters convert (toolkit.heads, built from the same state dict) gives the same logits.
    import torch

    from toolkit.heads import create_head

    head = create_head(p.kind, 16, 3)
    head.load_state_dict({k: torch.from_numpy(v) for k, v in p.tensors.items()})
    with torch.no_grad():
        np.testing.assert_allclose(head.eval()(torch.from_numpy(x)).numpy(), head_logits(p, x), rtol=1e-5, atol=1e-5)
    assert all(k.startswith("head.") for k in model_tensors(p))


def test_binary_logreg_is_a_two_row_softmax():
    x, y = blobs(n_classes=2)
    p = fit_head("logreg", x, y, 2)
    assert p.tensors["layers.1.weight"].shape == (2, 16)
    assert (head_logits(p, x).argmax(1) == y).mean() > 0.9


def test_every_head_fits_without_torch():
    """The robot refits the bundle's own head recipe, whichever head selection chose: every
    registered head fits and predicts in a process where torch cannot be imported."""
    from .test_robot import stdout_without_torch

    out = stdout_without_torch(
        "from toolkit.head_fit import HEADS, Prior, fit_head, head_logits\n"
        "prior = Prior(np.random.default_rng(0).normal(size=(7, x.shape[1])).astype(np.float32), np.zeros(7, np.float32))\n"
        "for name in HEADS:\n"
        "    assert (head_logits(fit_head(name, x, y, 3, prior=prior), x).argmax(1) == y).mean() > 0.9, name\n"
        "print(sorted(HEADS), 'torch' in sys.modules)\n")
    names, loaded = out.strip().rsplit(" ", 1)
    assert loaded == "False" and {"logreg", "prototypes", "prior", "imprint", "linear", "mlp"} <= set(eval(names))


@pytest.mark.parametrize("hidden", [None, 6])
def test_sgd_head_gradients_are_the_losss_derivatives(hidden):
    """The SGD heads' hand-written backward pass (dropout, soft targets, row weights, a fold axis)
    against central differences of its own loss, in float64."""
    from toolkit.head_fit import _loss_and_grads

    rng = np.random.default_rng(0)
    folds, rows, d, c = 2, 5, 4, 3
    sizes = [(d, hidden), (hidden, c)] if hidden else [(d, c)]
    layers = [(rng.normal(size=(folds, i, o)), rng.normal(size=(folds, o))) for i, o in sizes]
    xb = rng.normal(size=(folds, rows, d))
    t = rng.dirichlet(np.ones(c), size=(folds, rows))
    weight = rng.uniform(0, 1, (folds, rows))
    keep_in = (rng.random(xb.shape) < 0.7) / 0.7
    keep_hidden = (rng.random((folds, rows, hidden)) < 0.7) / 0.7 if hidden else None
    _, grads = _loss_and_grads(layers, xb, t, weight, keep_in, keep_hidden)
    params = [q for wb in layers for q in wb]
    for q, g in zip(params, grads):
        numeric = np.zeros_like(q)
        for i in np.ndindex(q.shape):
            q[i] += 1e-6
            up = _loss_and_grads(layers, xb, t, weight, keep_in, keep_hidden)[0]
            q[i] -= 2e-6
            down = _loss_and_grads(layers, xb, t, weight, keep_in, keep_hidden)[0]
            q[i] += 1e-6
            numeric[i] = (up - down) / 2e-6
        np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-7)


def test_sgd_heads_adamw_is_torchs():
    import torch

    from toolkit.head_fit import _adamw

    rng = np.random.default_rng(1)
    start = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)]
    grads = [[rng.normal(size=q.shape).astype(np.float32) for q in start] for _ in range(6)]
    mine = [q.copy() for q in start]
    step = _adamw(mine, [0.05, 0.0], 1e-2)
    theirs = [torch.tensor(q, requires_grad=True) for q in start]
    opt = torch.optim.AdamW([{"params": [theirs[0]], "weight_decay": 0.05},
                             {"params": [theirs[1]], "weight_decay": 0.0}], lr=1e-2)
    for g in grads:
        step(g)
        for q, gq in zip(theirs, g):
            q.grad = torch.from_numpy(gq)
        opt.step()
    for a, b in zip(mine, theirs):
        np.testing.assert_allclose(a, b.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_head_fit_imports_without_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch': raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numpy as np\n"
            "from toolkit.head_fit import fit_head, head_logits\n"
            "x = np.random.default_rng(0).random((20, 8)).astype('float32'); y = np.arange(20) % 2\n"
            "for n in ('logreg', 'prototypes', 'imprint', 'linear', 'mlp'): head_logits(fit_head(n, x, y, 2), x)\n"
            "from toolkit.head_fit import cross_validate\n"
            "cross_validate(['prototypes', 'imprint', 'logreg', 'linear', 'mlp'], x, y, 2, folds=3)\n"
            # scikit-learn's import alone was a fifth of head selection: CV must not load it.
            "assert 'sklearn' not in sys.modules, 'head fitting imported scikit-learn'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("n_classes", [2, 7])
def test_logreg_is_scikit_learns_logistic_regression(n_classes):
    import warnings

    from sklearn.linear_model import LogisticRegression

    from toolkit.head_fit import LOGREG_C, _balanced_weights, _standardizer

    x, y = blobs(n_per_class=30, n_classes=n_classes, d=24, spread=2.0)
    keep = np.flatnonzero((y != 1) | (np.arange(len(y)) % 3 == 0))  # unbalanced: weights matter
    x, y = x[keep], y[keep]
    path = HEADS["logreg"].path(x, y, n_classes + 1, 0)  # one class never seen
    mean, inv_std = _standardizer(x)
    ref = LogisticRegression(max_iter=300, warm_start=True, tol=1e-3)
    for (opts, params), c in zip(path, sorted(LOGREG_C)):
        ref.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref.fit((x - mean) * inv_std, y, sample_weight=_balanced_weights(y, n_classes + 1))
        logits = head_logits(params, x)
        assert opts == {"C": c} and (logits.argmax(1) < n_classes).all()
        p = np.exp(logits[:, :n_classes] - logits[:, :n_classes].max(1, keepdims=True))
        np.testing.assert_allclose(p / p.sum(1, keepdims=True), ref.predict_proba((x - mean) * inv_std), atol=0.02)


def test_cv_folds_are_scikit_learns_stratified_k_fold():
    from sklearn.model_selection import StratifiedKFold

    rng = np.random.default_rng(3)
    for trial in range(40):
        # Non-contiguous labels, unbalanced, the rarest class with 2-12 images: fewer folds than 5.
        y = np.concatenate([rng.choice([7, 2, 40], p=[0.5, 0.3, 0.2], size=int(rng.integers(60, 200))),
                            np.full(int(rng.integers(2, 12)), 11)])
        y = y[rng.permutation(len(y))]
        seed = int(rng.integers(0, 10_000))
        k = min(5, int(np.unique(y, return_counts=True)[1].min()))
        ours = cv_folds(y, 5, seed)
        ref = list(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
        assert len(ours) == len(ref)
        for (tr, te), (tr_ref, te_ref) in zip(ours, ref):
            np.testing.assert_array_equal(tr, tr_ref)
            np.testing.assert_array_equal(te, te_ref)


def test_mlp_head_has_the_mlp_layout():
    x, y = blobs()
    p = fit_head("mlp", x, y, 3, hidden=8, epochs=3)
    assert p.kind == "mlp" and p.tensors["layers.4.weight"].shape == (3, 8) and p.hidden == 8
    t = p.tensors  # the documented layout, written out: relu(x @ W1.T + b1) @ W2.T + b2 on standardised x
    xs = (x - t["feature_mean"]) * t["feature_inv_std"]
    expected = np.maximum(xs @ t["layers.1.weight"].T + t["layers.1.bias"], 0) @ t["layers.4.weight"].T + t["layers.4.bias"]
    np.testing.assert_allclose(head_logits(p, x), expected, rtol=1e-4, atol=1e-4)


def test_views_of_one_image_stay_in_one_fold():
    x, y = blobs(views=3)
    r = cross_validate(["prototypes", "logreg"], x, y, 3, folds=4)
    assert r.folds == 4
    # Every image is scored exactly once, out of fold, on its clean view.
    best = r.best
    assert best.oof_logits.shape == (36, 3) and np.all(best.oof_logits.any(1))
    assert {c.name for c in r.candidates} == {"prototypes", "logreg"}
    assert len([c for c in r.candidates if c.name == "logreg"]) > 1  # the C path is swept inside CV
    row = r.table()[0]
    assert set(row) == {"head", "options", "accuracy", "std", "fit_seconds"}


def test_cv_folds_shrink_to_the_smallest_class_and_refuse_singletons():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    assert len(cv_folds(y, 5, 0)) == 3
    from toolkit.errors import EdgetuneError

    with pytest.raises(EdgetuneError):
        cv_folds(np.array([0, 1, 1, 1]), 5, 0)


def test_cv_picks_the_best_head_at_its_simplest_setting_within_one_standard_error():
    x, y = blobs(n_per_class=10, n_classes=2, d=200, spread=2.0, seed=3)
    r = cross_validate(["prototypes", "logreg"], x, y, 2, folds=5)
    own = [c for c in r.candidates if c.name == r.best.name]
    top = max(own, key=lambda c: c.accuracy)
    se = np.std(top.fold_accuracy, ddof=1) / np.sqrt(5)
    assert r.best.accuracy >= top.accuracy - se - 1e-9
    assert all(c.accuracy < top.accuracy - se for c in own[: own.index(r.best)])  # nothing simpler within 1 SE
    assert all(r.shipped(h).accuracy <= r.best.accuracy for h in ("prototypes", "logreg"))
    assert r.table()[0]["accuracy"] == round(r.best.accuracy, 5)


def _candidate(name, options, folds):
    from toolkit.head_fit import Candidate

    return Candidate(name, options, folds, 0.1, np.zeros((4, 2), np.float32))


def test_a_simpler_head_within_noise_does_not_beat_the_best_head():
    # caltech50's case: a simpler head one SE below the best head must not be chosen.
    from toolkit.head_fit import CVResult

    simple = _candidate("imprint", {"reg": 0.1}, [0.93, 0.95, 0.94, 0.95, 0.945])
    strong = _candidate("logreg", {"C": 0.1}, [0.93, 0.96, 0.95, 0.95, 0.95])
    best = _candidate("logreg", {"C": 1.0}, [0.93, 0.97, 0.95, 0.95, 0.95])
    r = CVResult(5, [simple, strong, best], np.zeros(4, np.int64))
    assert r.best is strong  # the stronger L2 of the best head, within its SE; never imprint


def test_heads_are_compared_on_the_setting_each_would_ship():
    # caltech50 10 shots' case: imprint's best setting tops the table, but within its wide spread
    # the 1-SE rule would ship its strongest pull, below logistic regression's steady setting.
    from toolkit.head_fit import CVResult

    pulled = _candidate("imprint", {"reg": 1.0}, [0.92, 0.96, 0.93, 0.95, 0.95])  # 0.942
    loose = _candidate("imprint", {"reg": 0.01}, [0.92, 0.98, 0.94, 0.96, 0.96])  # 0.952, SE 0.010
    steady = _candidate("logreg", {"C": 0.003}, [0.94, 0.95, 0.95, 0.95, 0.94])  # 0.946
    r = CVResult(5, [pulled, loose, steady], np.zeros(4, np.int64))
    assert r.shipped("imprint") is pulled and r.shipped("logreg") is steady
    assert r.best is steady and r.per_head() == [steady, pulled]
    assert r.table()[0] == steady.to_json()


def test_balanced_weights_keep_a_small_class_alive():
    x, y = blobs(n_per_class=40, n_classes=2, spread=1.5, seed=5)
    keep = np.r_[np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:3]]
    p = fit_head("logreg", x[keep], y[keep], 2, C=0.1)
    assert (head_logits(p, x[y == 1]).argmax(1) == 1).mean() > 0.7


def test_vae_samples_look_like_their_class():
    from toolkit.generate import fit_cvae, vae_augmenter

    x, y = blobs(n_per_class=30, spread=0.5, seed=2)
    sample = fit_cvae(x, y, 3, epochs=40)
    gx, gy = sample(np.array([20, 20, 20]), seed=0)
    assert gx.shape == (60, 16) and gx.min() >= 0 and gx.max() <= 6
    p = fit_head("logreg", x, y, 3)
    assert (head_logits(p, gx).argmax(1) == gy).mean() > 0.9
    ax, ay = vae_augmenter(0.5)(x, y, 3, 0)
    assert len(ax) == len(x) + 45 and np.bincount(ay).tolist() == [45, 45, 45]


def test_keep_shots_is_seeded_per_class_and_refuses_too_many():
    from toolkit.errors import DataError
    from toolkit.selection import keep_shots

    y = np.repeat([0, 1, 2], [5, 8, 6])
    a = keep_shots(y, 3, 0, ["a", "b", "c"], "DATA")
    assert np.bincount(y[a]).tolist() == [3, 3, 3]
    assert np.array_equal(a, keep_shots(y, 3, 0, ["a", "b", "c"], "DATA"))
    assert not np.array_equal(a, keep_shots(y, 3, 1, ["a", "b", "c"], "DATA"))
    with pytest.raises(DataError, match="class 'a'"):
        keep_shots(y, 6, 0, ["a", "b", "c"], "DATA")


def test_selection_falls_back_to_a_rule_below_two_images():
    from toolkit.selection import select_head

    x, y = blobs(n_per_class=1, views=3)
    sel = select_head("auto", x, y, 3)
    assert sel.cv is None and sel.params.name == "imprint" and "too few" in sel.reason
    named = select_head("auto", x, y, 3, class_names=["ants", "bees", "wasps"])
    assert "class 'ants' has 1 training image(s)" in named.reason  # the user's name, not an index
    x, y = blobs(n_per_class=6, views=2)
    sel = select_head("auto", x, y, 3, candidates=("prototypes", "logreg"), folds=3)
    assert sel.cv.folds == 3 and sel.to_json()["runner_up"] is not None


def test_sgd_heads_snapshot_every_checkpoint_and_fit_all_folds_at_once():
    from toolkit.head_fit import SGD_EPOCH_CHECKPOINTS, _sgd_folds

    x, y = blobs(n_per_class=40, n_classes=3, d=16, spread=0.5, views=2, seed=4)
    flat, labels = x.reshape(-1, x.shape[-1]), np.repeat(y, 2)
    rows = [np.flatnonzero(np.repeat(np.arange(len(y)) % 3 != f, 2)) for f in range(3)]
    paths = _sgd_folds("mlp", flat, labels, rows, 3, [0, 1, 2], views=2, hidden=32, dropout=0.1)
    assert len(paths) == 3 and [o["epochs"] for o, _ in paths[0]] == list(SGD_EPOCH_CHECKPOINTS)
    weights = [p.tensors["layers.4.weight"] for _, p in paths[0]]
    # Snapshots are copies: a view of the live parameter would make every checkpoint the last one.
    assert not np.allclose(weights[0], weights[-1])
    for f, path in enumerate(paths):
        held_out = np.arange(len(y)) % 3 == f
        assert (head_logits(path[-1][1], x[held_out, 0]).argmax(1) == y[held_out]).mean() > 0.9


def test_cross_validate_runs_heads_concurrently_with_the_same_result():
    # Heads are cross-validated on two workers, longest first (two SGD heads may run at once):
    # every candidate must score exactly as when its head is cross-validated alone.
    x, y = blobs(n_per_class=30, n_classes=3, d=16, spread=0.8, views=2, seed=5)
    names, opts = ("prototypes", "logreg", "linear", "mlp"), {"mlp": {"hidden": 8}}
    together = cross_validate(list(names), x, y, 3, folds=3, options=opts)
    alone = {c.label: c for name in names for c in cross_validate([name], x, y, 3, folds=3, options=opts).candidates}
    assert [c.label for c in together.candidates] == list(alone)  # caller's order kept
    for c in together.candidates:
        assert c.fold_accuracy == alone[c.label].fold_accuracy
        np.testing.assert_array_equal(c.oof_logits, alone[c.label].oof_logits)


def test_an_epoch_path_stops_once_cv_falls_clearly_below_its_best():
    from toolkit.head_fit import HeadParams, _path_stopper

    # One-hot features, so a linear head can predict any labels we like row by row.
    n, labels = 40, np.arange(40) % 2
    splits = cv_folds(labels, 5, 0)
    views = np.eye(n, dtype=np.float32)[:, None, :]

    def predicting(wrong_per_fold):  # a snapshot per fold, wrong on its first k held-out rows
        out = []
        for (_, te), k in zip(splits, wrong_per_fold):
            pred = labels.copy()
            pred[te[:k]] = 1 - pred[te[:k]]
            out.append(HeadParams("linear", {"feature_mean": np.zeros(n, np.float32),
                                             "feature_inv_std": np.ones(n, np.float32),
                                             "layers.1.weight": np.eye(2, dtype=np.float32)[pred].T.copy(),
                                             "layers.1.bias": np.zeros(2, np.float32)}, "linear"))
        return out

    stop = _path_stopper(views, labels, splits)
    assert not stop(predicting([0, 1, 0, 1, 0]))  # the best so far: 0.95, standard error 0.03
    assert not stop(predicting([1, 1, 0, 1, 1]))  # 0.90: within two standard errors of the best
    assert stop(predicting([2, 1, 2, 1, 2]))  # 0.80: clearly overfitting, the next doubling is skipped


def test_a_stopped_sgd_path_keeps_the_checkpoints_it_reached():
    from toolkit.head_fit import SGD_EPOCH_CHECKPOINTS, _sgd_folds

    x, y = blobs(n_per_class=10, n_classes=2, d=8)
    rows = [np.flatnonzero(np.arange(len(y)) % 2 != f) for f in range(2)]
    asked = []
    paths = _sgd_folds("linear", x, y, rows, 2, [0, 1],
                         stop=lambda latest: asked.append(len(latest)) or len(asked) == 2)
    assert asked == [2, 2]  # every fold's latest snapshot, at each checkpoint until it said stop
    assert [[o["epochs"] for o, _ in p] for p in paths] == [list(SGD_EPOCH_CHECKPOINTS[:2])] * 2


@pytest.mark.parametrize("frame", ["standardize", "normalize"])
def test_streamed_rows_are_the_whole_rows_chunk_by_chunk(frame, monkeypatch):
    # Rows too many for ROWS_BUDGET are re-read from the features a chunk at a time: in the same
    # order and frame as when held whole, and the caller's features are never written to.
    import toolkit.head_fit as hf

    x = np.random.default_rng(3).uniform(0, 6, (300, 16)).astype(np.float32)
    before = x.copy()
    idx = np.random.default_rng(4).permutation(300)[:170]

    def read(budget):
        monkeypatch.setattr(hf, "ROWS_BUDGET", budget)
        monkeypatch.setattr(hf, "CHUNK_ROWS", 32)
        rows = hf._Rows(x, idx)
        stat = getattr(rows, frame)()
        chunks = list(rows.chunks())
        assert all(len(c) <= (32 if budget == 0 else 170) for _, c in chunks)
        return stat, np.concatenate([c for _, c in chunks])

    (whole_stat, whole), (streamed_stat, streamed) = read(1 << 30), read(0)
    np.testing.assert_allclose(streamed, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(streamed_stat, whole_stat, rtol=1e-5)
    if frame == "normalize":
        np.testing.assert_allclose(np.linalg.norm(whole, axis=1), 1.0, rtol=1e-5)
    else:
        np.testing.assert_allclose(whole, (x[idx] - x[idx].mean(0)) / x[idx].std(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("name", ["logreg", "imprint", "linear", "mlp"])
def test_heads_streamed_from_float16_match_the_whole_array_fit(name, monkeypatch):
    # A fold too big for ROWS_BUDGET is fitted from the float16 cache a chunk at a time: the same
    # head as when its rows are held whole, to float rounding. Unbalanced classes and a shuffled
    # subset of rows, as cross-validation hands a fold over.
    import toolkit.head_fit as hf

    x, y = blobs(n_per_class=40, n_classes=3, d=16, spread=0.8, views=3, seed=2)
    x, y = x.reshape(-1, 16).astype(np.float16), np.repeat(y, 3)
    rows = np.random.default_rng(5).permutation(np.flatnonzero((y != 0) | (np.arange(len(y)) % 4 == 0)))[:200]
    opts = {"mlp": {"hidden": 8, "epochs": 5}, "linear": {"epochs": 5}}.get(name, {})
    dense = HEADS[name].path(x, y, 3, 0, rows=rows, **opts)[-1][1]
    monkeypatch.setattr(hf, "ROWS_BUDGET", 0)
    monkeypatch.setattr(hf, "CHUNK_ROWS", 32)
    streamed = HEADS[name].path(x, y, 3, 0, rows=rows, **opts)[-1][1]
    for key, value in dense.tensors.items():  # L-BFGS stops within its tolerance of the same optimum
        np.testing.assert_allclose(streamed.tensors[key], value, rtol=1e-2, atol=1e-3, err_msg=key)
    np.testing.assert_array_equal(head_logits(streamed, x).argmax(1), head_logits(dense, x).argmax(1))


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_path_on_some_rows_is_the_path_on_a_copy_of_those_rows(name):
    # Cross-validation hands each fold to a head as row indices into the shared features.
    from toolkit.head_fit import Prior

    x, y = blobs(n_per_class=20, n_classes=3, d=16, spread=0.8, seed=4)
    rows = np.random.default_rng(0).permutation(len(y))[:40]
    kw = {"prior": Prior(np.random.default_rng(1).normal(0, 0.3, (7, 16)).astype(np.float32), np.zeros(7, np.float32))} \
        if HEADS[name].needs_prior else {}
    kw.update({"hidden": 8, "epochs": 5} if name == "mlp" else {"epochs": 5} if name == "linear" else {})
    on_rows = HEADS[name].path(x, y, 3, 0, rows=rows, **kw)
    on_copy = HEADS[name].path(x[rows], y[rows], 3, 0, **kw)
    assert [o for o, _ in on_rows] == [o for o, _ in on_copy]
    for (_, a), (_, b) in zip(on_rows, on_copy):
        for key in b.tensors:
            np.testing.assert_array_equal(a.tensors[key], b.tensors[key], err_msg=key)


@pytest.mark.parametrize("budget", [1 << 30, 0])
def test_class_means_sum_each_class_in_row_order(budget, monkeypatch):
    # Imprinting starts from each class's mean unit row: shuffled, unbalanced labels (one class
    # absent), rows held whole or streamed in chunks that split classes, give np.add.at's sums.
    import toolkit.head_fit as hf

    monkeypatch.setattr(hf, "ROWS_BUDGET", budget)
    monkeypatch.setattr(hf, "CHUNK_ROWS", 7)
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (90, 12)).astype(np.float16)
    y = rng.choice([0, 1, 3], size=90, p=[0.6, 0.3, 0.1])
    rows = rng.permutation(90)[:61]
    expected = np.zeros((4, 12))
    np.add.at(expected, y[rows], x[rows].astype(np.float32))
    expected /= np.maximum(np.bincount(y[rows], minlength=4), 1)[:, None]
    expected /= np.maximum(np.linalg.norm(expected, axis=1, keepdims=True), 1e-6)
    got = hf._class_means(hf._Rows(x, rows), y[rows], 4)
    if budget:
        np.testing.assert_array_equal(got, expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert not got[2].any()


def test_float16_rows_cast_exactly_and_copy_only_when_asked():
    # Head fits cast the float16 feature cache through OpenCV: every float16 value (subnormals,
    # infinities, NaN) comes out as numpy's own cast, in any shape; float32 is copied only on request.
    from toolkit.head_fit import _to_float32

    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    for shape in [(65536,), (256, 256), (64, 4, 256)]:
        x = every.reshape(shape)
        got = _to_float32(x[:, ::2] if x.ndim == 2 else x)  # a strided view too
        want = (x[:, ::2] if x.ndim == 2 else x).astype(np.float32)
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # NaNs compare equal here
    assert _to_float32(np.zeros((0, 8), np.float16)).shape == (0, 8)
    x32 = np.ones((3, 4), np.float32)
    assert np.shares_memory(_to_float32(x32), x32)
    copied = _to_float32(x32, copy=True)
    copied += 1
    assert (x32 == 1).all()


@pytest.mark.parametrize("name, options", [("logreg", {"C": 0.1}), ("imprint", {"reg": 0.1}), ("linear", {"epochs": 5})])
def test_a_linear_head_plus_the_rule_is_one_prior_head_whose_logits_are_their_sum(name, options):
    """learn's refit for a few-shot class on a bundle with a discriminative linear head: the two
    heads' logits summed, in the prior head's layout (each side's standardisation folded in)."""
    from toolkit.head_fit import Prior, with_prior_votes
    from toolkit.learn import PRODUCT_RECIPES

    assert name in PRODUCT_RECIPES
    x, y = blobs(n_per_class=20, n_classes=3, d=16, spread=0.8, seed=5)
    x = np.maximum(x + 1.0, 0)  # post-ReLU-like features with a mean a standardising head removes
    prior = Prior(np.random.default_rng(1).normal(0, 0.3, (7, 16)).astype(np.float32), np.zeros(7, np.float32))
    head = fit_head(name, x, y, 3, **options)
    rule = fit_head("prior", x, y, 3, prior=prior, weight=0.25)
    both = with_prior_votes(head, rule)
    assert name == "imprint" or not np.allclose(head.tensors["feature_mean"], 0)  # the fold is exercised
    assert (both.kind, both.name) == ("prior", f"{name}+prior") and both.options["prior_weight"] == 0.25
    np.testing.assert_allclose(head_logits(both, x), head_logits(head, x) + head_logits(rule, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        with_prior_votes(rule, head)
