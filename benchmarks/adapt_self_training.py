"""Would self-training on the target images add to `adapt --method camera`? Measured on TRAINING images.

    python benchmarks/adapt_self_training.py hymenoptera RUN_H      # RUN_* = a default `edgetune train`
    python benchmarks/adapt_self_training.py caltech50 RUN_C

Each class's training images are split in thirds: A (the run's selected head refitted on them), T
(the unlabelled target: A's camera shift applied to OTHER images, as a robot's new scenes are) and
B (shifted, scored). Per camera shift of benchmarks/small_data.py: diag alignment; camera (fitted to
64 of T against 64 of A, every view of A rendered, the head refitted, as adapt does); then T's
features pseudo-labelled by a head and added to its training set (each T image tiled to the run's
views), the head refitted again: after the plain head (pl) or after the camera refit (cam+pl), with
all of T (1.0) or the most confident half of each predicted class (0.5). Prints each shift and the
mean share of each shift's cost won back (shifts costing > 0.5 pt), the share of the summed cost
and the change on the unshifted set; BENCHMARKS.md "Camera shift (adapt)" quotes it.
"""
import glob
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import DATASETS, SHIFTS  # noqa: E402

from toolkit import adapt as ad  # noqa: E402
from toolkit.augment import build_augmentation, eval_resize_shorter, eval_view, training_view  # noqa: E402
from toolkit.data import decode_images, discover  # noqa: E402
from toolkit.features import create_engine, extract_features  # noqa: E402
from toolkit.head_fit import HeadParams, fit_head, head_logits, one_blas_thread  # noqa: E402
from toolkit.runs import RunDir  # noqa: E402

FRACTIONS = (0.5, 1.0)


def thirds(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for k in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == k))
        n = len(idx) // 3
        for part, chunk in zip(parts, (idx[:n], idx[n:2 * n], idx[2 * n:])):
            part.extend(chunk)
    return tuple(np.sort(np.array(p)) for p in parts)


def main() -> None:
    name, run_path = sys.argv[1], sys.argv[2]
    run = RunDir.open(run_path)
    spec, c, sel = run.spec, run.config["train"], run.config["head_selection"]
    cache = np.load(glob.glob(f"{run_path}/state/*.npz")[0])
    train, y = cache["train"], cache["train_labels"]
    a, t, b = thirds(y)
    n_classes, n_views, size = int(y.max()) + 1, train.shape[1], spec.input_size

    def fit(x, labels):
        with one_blas_thread():
            return fit_head(sel["selected"], x, labels, n_classes, seed=0, **sel["options"]).tensors

    def logits(tensors, x):
        return head_logits(HeadParams(c["head"], tensors, "x"), x)

    def accuracy(tensors, x) -> float:
        return float((logits(tensors, x).argmax(1) == y[b]).mean())

    def self_trained(tensors, target, base_x, fraction):
        """(head refitted with T pseudo-labelled by `tensors`, pseudo-label accuracy)."""
        z = logits(tensors, target)
        p = np.exp(z - z.max(1, keepdims=True))
        pred, conf = p.argmax(1), p.max(1) / p.sum(1)
        keep = []
        for k in range(n_classes):  # class-balanced: the most confident `fraction` of each predicted class
            idx = np.flatnonzero(pred == k)
            keep += list(idx[np.argsort(-conf[idx])][: max(1, round(fraction * len(idx)))]) if len(idx) else []
        keep = np.sort(np.array(keep))
        tiled = np.repeat(target[keep][:, None], base_x.shape[1], axis=1)
        refit = fit(np.concatenate([base_x, tiled]), np.concatenate([y[a], pred[keep]]))
        return refit, float((pred[keep] == y[t][keep]).mean())

    head = fit(train[a], y[a])
    images, _, _ = decode_images(discover(DATASETS[name]).train, min_side=eval_resize_shorter(size))
    views = [eval_view(im, size) for im in images]
    aug = build_augmentation(c["augment"], size=size, overrides=c["augment_overrides"])
    engine = create_engine(spec.name, "openvino", "CPU")

    def features(vs):
        return extract_features(engine, lambda k: vs[k], len(vs))

    clean = accuracy(head, train[b, 0].astype(np.float32))
    rows = []
    for shift, fn in {"none": None, **SHIFTS}.items():
        for strength in ((0,) if fn is None else (0, 1)):
            t0 = time.perf_counter()

            def shifted(im, fn=fn, strength=strength):
                return im if fn is None else fn(im, strength)

            xt, xb = features([shifted(views[i]) for i in t]), features([shifted(views[i]) for i in b])
            r = {"clean": clean, "none": accuracy(head, xb), "diag": accuracy(ad.align_head(head, "diag", train[a, 0], xt), xb)}
            camera = ad.fit_run_camera(engine, [views[i] for i in a[:64]], xt[:64]).camera
            refit, base_x = head, train[a]
            if not camera.is_identity:
                def rendered_view(k, camera=camera):
                    i = a[k // n_views]
                    return camera.render(training_view(images[i], i, k % n_views, aug, seed=c["seed"], size=size), seed=k)

                rendered = extract_features(engine, rendered_view, len(a) * n_views).reshape(len(a), n_views, -1)
                base_x = np.concatenate([train[a], rendered], 1)
                refit = fit(base_x, y[a])
            r["camera"] = accuracy(refit, xb)
            for fraction in FRACTIONS:
                tensors, r[f"label acc {fraction}"] = self_trained(refit, xt, base_x, fraction)
                r[f"cam+pl {fraction}"] = accuracy(tensors, xb)
                r[f"pl {fraction}"] = accuracy(self_trained(head, xt, train[a], fraction)[0], xb)
            rows.append((f"{shift}-{strength}", r))
            print(f"{shift}-{strength} ({time.perf_counter() - t0:.0f} s, {camera.describe()})",
                  {k: round(v, 4) for k, v in r.items()}, flush=True)
    print(f"{name}: A / T / B = {len(a)} / {len(t)} / {len(b)} images; B clean {clean:.4f}")
    costly = [r for n, r in rows if not n.startswith("none")]
    for key in ["diag", "camera"] + [f"{m} {f}" for f in FRACTIONS for m in ("pl", "cam+pl")]:
        shares = [(r[key] - r["none"]) / (r["clean"] - r["none"]) for r in costly if r["clean"] - r["none"] > 0.005]
        summed = sum(r[key] - r["none"] for r in costly) / sum(r["clean"] - r["none"] for r in costly)
        print(f"{key:12s} mean share {np.mean(shares):.0%} ({len(shares)} shifts), summed {summed:.0%}; "
              f"unshifted {rows[0][1][key] - rows[0][1]['none']:+.4f}", flush=True)


if __name__ == "__main__":
    main()
