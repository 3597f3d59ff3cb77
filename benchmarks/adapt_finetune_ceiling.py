"""Would fine-tuning the backbone's tail beat refitting the head, for `adapt`? A ceiling check.

    python benchmarks/adapt_finetune_ceiling.py hymenoptera RUN --tail 2 --epochs 3 --shifts blur-1 jpeg-1

RUN = a default `edgetune train` of the set (MLP head). For each camera shift of
benchmarks/small_data.py, every training view (the run's own views, as adapt re-draws them) is
rendered by the shift itself (an exact camera fit) and, as in small_data's "oracle camera" column,
the run's head is refitted on the run's views plus the rendered ones. Then the last `--tail`
blocks of the backbone (BatchNorm frozen) and that head are fine-tuned in torch on the same views
for a fixed `--epochs` (set before looking; val only scores). Prints shifted-val accuracy of both;
BENCHMARKS.md "Camera shift (adapt)" quotes it. Slow on CPU (eager torch over every view: minutes
per shift), so it is a measurement, not a method of adapt.
"""
import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import DATASETS, SHIFTS  # noqa: E402

from toolkit import adapt as ad  # noqa: E402
from toolkit.augment import eval_resize_shorter, eval_view  # noqa: E402
from toolkit.data import decode_images, discover  # noqa: E402
from toolkit.head_fit import HeadParams, fit_head, head_logits  # noqa: E402
from toolkit.runs import RunDir  # noqa: E402


def main() -> None:
    import torch

    from toolkit.backbones import create_backbone

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=list(DATASETS))
    ap.add_argument("run", type=Path)
    ap.add_argument("--tail", type=int, default=2, help="backbone blocks fine-tuned (plus the head conv)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--shifts", nargs="+", default=[f"{k}-{s}" for k in SHIFTS for s in (0, 1)], help="e.g. blur-1")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    run = RunDir.open(args.run)
    spec, sel = run.spec, run.config["head_selection"]
    assert run.config["train"]["head"] == "mlp", "written for an MLP head (ants/bees' default)"
    f = np.load(glob.glob(f"{args.run}/state/*.npz")[0])
    train, ytr, yva = f["train"], f["train_labels"], f["val_labels"]
    n, v = train.shape[:2]
    val_images, _, _ = decode_images(discover(DATASETS[args.dataset]).val, min_side=eval_resize_shorter(spec.input_size))
    assert len(val_images) == len(yva), "dataset changed since the run"
    val_views = [eval_view(im, spec.input_size) for im in val_images]
    make = ad._training_views(run, ad._training_files(run, n), v, 32, 2)

    bb = create_backbone(spec.name).eval()  # eval: BatchNorm statistics stay frozen while the tail trains
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    front_blocks, tail_blocks = bb._blocks[:-args.tail], bb._blocks[-args.tail:]

    @torch.no_grad()
    def front(views):  # the frozen part, once per view
        out = []
        for i in range(0, len(views), 32):
            x = (torch.from_numpy(np.stack(views[i:i + 32])).permute(0, 3, 1, 2).float() - mean) / std
            x = bb.act(bb._bn0(bb._conv_stem(x)))
            for b in front_blocks:
                x = b(x)
            out.append(x)
        return torch.cat(out)

    def tail(x):
        for b in tail_blocks:
            x = b(x)
        return bb.act(bb._bn1(bb._conv_head(x))).mean(dim=(2, 3))

    def torch_head(t):
        layers = [torch.nn.Linear(*t[f"layers.{i}.weight"].shape[::-1]) for i in (1, 4)]
        with torch.no_grad():
            for i, layer in zip((1, 4), layers):
                layer.weight.copy_(torch.from_numpy(t[f"layers.{i}.weight"]))
                layer.bias.copy_(torch.from_numpy(t[f"layers.{i}.bias"]))
        m, s = torch.from_numpy(t["feature_mean"]), torch.from_numpy(t["feature_inv_std"])
        return (lambda x: layers[1](torch.relu(layers[0]((x - m) * s)))), [p for layer in layers for p in layer.parameters()]

    start = {k: t.clone() for k, t in bb.state_dict().items()}
    clean = front([make(k) for k in range(n * v)])
    for name in args.shifts:
        shift, strength = name.rsplit("-", 1)
        fn, s = SHIFTS[shift], int(strength)
        t0 = time.perf_counter()
        bb.load_state_dict(start)
        rendered, val = front([fn(make(k), s) for k in range(n * v)]), front([fn(x, s) for x in val_views])
        with torch.no_grad():
            pooled = lambda x: torch.cat([tail(x[i:i + 64]) for i in range(0, len(x), 64)])  # noqa: E731
            rendered_features, val_features = pooled(rendered).numpy(), pooled(val).numpy()
        refit = fit_head(sel["selected"], np.concatenate([train, rendered_features.reshape(n, v, -1)], 1), ytr,
                         int(ytr.max()) + 1, seed=0, **sel["options"]).tensors
        result = {"head refit (oracle camera)": float((head_logits(HeadParams("mlp", refit, "x"), val_features)
                                                      .argmax(1) == yva).mean())}
        head, head_params = torch_head(refit)
        tail_params = [p for b in tail_blocks for p in b.parameters()] + list(bb._conv_head.parameters())
        opt = torch.optim.AdamW([{"params": head_params, "lr": 1e-3}, {"params": tail_params, "lr": 1e-4}],
                                weight_decay=1e-4)
        x, y = torch.cat([clean, rendered]), torch.from_numpy(np.repeat(ytr, v)).repeat(2)
        g = torch.Generator().manual_seed(0)
        for _ in range(args.epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 32):
                idx = perm[i:i + 32]
                loss = torch.nn.functional.cross_entropy(head(tail(x[idx])), y[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            pred = torch.cat([head(tail(val[i:i + 64])) for i in range(0, len(val), 64)]).argmax(1).numpy()
        result[f"tail {args.tail} blocks + head fine-tuned, {args.epochs} epochs"] = float((pred == yva).mean())
        print(f"{name} ({time.perf_counter() - t0:.0f} s)", {k: round(r, 4) for k, r in result.items()}, flush=True)


if __name__ == "__main__":
    main()
