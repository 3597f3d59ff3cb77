"""adapt --method camera: which views to render, chosen on TRAINING images only (never val).

    python benchmarks/adapt_choices.py hymenoptera RUN_H      # RUN_* = a default `edgetune train`
    python benchmarks/adapt_choices.py caltech50 RUN_C

The run's selected head is refitted on half A of each class's training images; the target is A
shifted (each camera shift of benchmarks/small_data.py); the camera is fitted to 64 shifted A images
against 64 OTHER clean A images; every variant is scored on the other half B, shifted (held out,
labelled). Variants: diag; 5+1 = the run's views + the rendered clean view; 5+5 = + every view
rendered (the augmented views re-drawn as training drew them); 5+5 corrected (adapt's default since
2026-12-04) = 5+5, but where the fit says the tone or white balance changed (CameraFit.corrects_tone)
the curve is fitted to pixels (toolkit.camera.fit_tone), undone on B by its lookup table, and the
renderings pass through the same table; the head is refitted on them unless the table undoes all
the fit found (toolkit.adapt.refits_head: then the run's head is kept); rendered only = the head fitted
on the rendered views alone; corrected+diag = the table where the fit found a tone change, then the
run's head aligned by diag (no refit). Prints each shift and, per variant,
the mean share of each shift's cost won back (shifts costing > 0.5 pt), the share of the summed
cost and the change on the unshifted set. BENCHMARKS.md "Camera shift (adapt)" quotes its output.
"""
import glob
import sys
import time
import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_data import SHIFTS, DATASETS
from toolkit import adapt as ad
from toolkit.augment import build_augmentation, eval_resize_shorter, eval_view, training_view
from toolkit.data import decode_images, discover
from toolkit.features import create_engine, extract_features
from toolkit.preprocess import apply_correction
from toolkit.head_fit import fit_head, head_logits, HeadParams, Prior, one_blas_thread
from toolkit.runs import RunDir

name, runp = sys.argv[1], sys.argv[2]
run = RunDir.open(runp)
spec, c = run.spec, run.config['train']
sel = run.config['head_selection']
f = np.load(glob.glob(f'{runp}/state/*.npz')[0])
tr, y = f['train'], f['train_labels']
rng = np.random.default_rng(0)
A = np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == k))[: (y == k).sum() // 2] for k in np.unique(y)]))
B = np.setdiff1d(np.arange(len(y)), A)
n_classes = int(y.max()) + 1
prior = Prior.from_tensors(run.head_tensors())  # a prior head refits with the classifier it carries
fit = lambda x, yy: fit_head(sel['selected'], x, yy, n_classes, seed=0, prior=prior, **sel['options']).tensors
with one_blas_thread():
    head = fit(tr[A], y[A])
splits = discover(DATASETS[name])
images, kept, _ = decode_images(splits.train, min_side=eval_resize_shorter(spec.input_size))
size = spec.input_size
views = [eval_view(im, size) for im in images]
aug = build_augmentation(c['augment'], size=size, overrides=c['augment_overrides'])
V = tr.shape[1]
fit_t = ad._subset(list(A), ad.MAX_BN_IMAGES)
fit_s = ad._subset(sorted(set(A) - set(fit_t)), ad.MAX_BN_IMAGES)
eng = create_engine(spec.name, 'openvino', 'CPU')
F = lambda vs: extract_features(eng, lambda k: vs[k], len(vs))
acc = lambda t, x: float((head_logits(HeadParams(c['head'], t, 'x'), x).argmax(1) == y[B]).mean())
clean = acc(head, tr[B, 0].astype(np.float32))
rows = []
for sname, fn in {'none': None, **SHIFTS}.items():
    for s in ((0,) if fn is None else (0, 1)):
        t0 = time.perf_counter()
        sh = (lambda im: im) if fn is None else (lambda im: fn(im, s))
        xa, xb = F([sh(views[i]) for i in A]), F([sh(views[i]) for i in B])
        r = {'clean': clean, 'none': acc(head, xb), 'diag': acc(ad.align_head(head, 'diag', tr[A, 0], xa), xb)}
        target_views = [sh(views[i]) for i in fit_t]
        cf = ad.fit_run_camera(eng, [views[i] for i in fit_s], F(target_views))
        h51 = h55 = hc = hr = head
        xc = xb
        hd = ad.align_head(head, 'diag', tr[A, 0], xa)  # corrected+diag: the table where it applies, then diag
        if not cf.camera.is_identity:
            cam = cf.camera
            def rendered_view(k, cam=cam, lut=None):
                i = A[k // V]
                return apply_correction(cam.render(training_view(images[i], i, k % V, aug, seed=c['seed'], size=size), seed=k), lut)

            rend = extract_features(eng, rendered_view, len(A) * V).reshape(len(A), V, -1)
            with one_blas_thread():
                h51 = fit(np.concatenate([tr[A], rend[:, :1]], 1), y[A])
                h55 = hc = fit(np.concatenate([tr[A], rend], 1), y[A])
            camc, lut = ad.render_and_correct(cf, [views[i] for i in fit_s], target_views)
            if lut is not None:  # as adapt does: the tone undone on the frames and the renderings
                xc = F([apply_correction(sh(views[i]), lut) for i in B])
                hd = ad.align_head(head, 'diag', tr[A, 0], F([apply_correction(sh(views[i]), lut) for i in A]))
                hc = head  # kept where the table undoes all the fit found
                if ad.refits_head(camc, lut):
                    rc = extract_features(eng, lambda k: rendered_view(k, camc, lut), len(A) * V).reshape(len(A), V, -1)
                    with one_blas_thread():
                        hc = fit(np.concatenate([tr[A], rc], 1), y[A])
                        hr = fit(rc, y[A])
            else:
                with one_blas_thread():
                    hr = fit(rend, y[A])
        r['5+1'], r['5+5'], r['5+5 corrected'] = acc(h51, xb), acc(h55, xb), acc(hc, xc)
        # the head fitted on the rendered views alone (the new camera's only), through the table where it applies
        r['rendered only'] = acc(hr, xc)
        r['corrected+diag'] = acc(hd, xc)
        rows.append((f'{sname}-{s}', r))
        corrected = f'; corrected {camc.tone_only().describe()}' if cf.corrects_tone else ''
        print(f'{sname}-{s} ({time.perf_counter()-t0:.0f}s) {cf.camera.describe()}{corrected}', {k: round(v, 4) for k, v in r.items()}, flush=True)
print('clean B', clean)
for k in ('diag', '5+1', '5+5', '5+5 corrected', 'rendered only', 'corrected+diag'):
    sh = [r for n, r in rows if not n.startswith('none')]
    shares = [(r[k] - r['none']) / (r['clean'] - r['none']) for r in sh if r['clean'] - r['none'] > 0.005]
    summed = sum(r[k] - r['none'] for r in sh) / sum(r['clean'] - r['none'] for r in sh)
    print(f'{k:14s} mean share {np.mean(shares):.0%} ({len(shares)} shifts) summed {summed:.0%}; unshifted {rows[0][1][k] - rows[0][1]["none"]:+.4f}')
