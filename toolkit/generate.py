"""Generated training points: a small conditional VAE on cached backbone features.

The VAE learns p(feature | class) in the standardised feature space as class mean + a decoded
offset (encoder and decoder both see the one-hot class), then samples extra points per class. It runs inside each CV fold on that
fold's training rows only, so CV measures whether the generated points help, and `--head auto`
keeps them only if they do (see toolkit.selection). Host-side (torch); the exported head is
fitted on real + generated points and exports like any other.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LATENT = 32
HIDDEN = 256


def fit_cvae(x: np.ndarray, y: np.ndarray, n_classes: int, *, seed: int = 0, epochs: int = 60,
             batch_size: int = 128, beta: float = 0.5):
    """Train a conditional VAE on (N, D) features; returns sample(counts per class, rng) -> (X, y)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-2)
    xs_np = ((x - mean) / std).astype(np.float32)
    # The VAE models each point's offset from its class mean; sampling adds the mean back. A plain
    # cVAE can carry the class in z and ignore the condition, and prior samples then land in the
    # wrong class (58% right on a 3-class toy); anchored offsets cannot drift across classes.
    centres = np.zeros((n_classes, x.shape[1]), np.float32)
    np.add.at(centres, y, xs_np)
    centres /= np.maximum(np.bincount(y, minlength=n_classes), 1)[:, None]
    xs = torch.from_numpy(xs_np - centres[y])
    onehot = torch.eye(n_classes)[torch.from_numpy(y)]
    d = x.shape[1]
    enc = nn.Sequential(nn.Linear(d + n_classes, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 2 * LATENT))
    dec = nn.Sequential(nn.Linear(LATENT + n_classes, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, d))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=g).split(batch_size):
            xb, cb = xs[idx], onehot[idx]
            mu, logvar = enc(torch.cat([xb, cb], 1)).chunk(2, 1)
            z = mu + torch.randn(mu.shape, generator=g) * (0.5 * logvar).exp()
            rec = dec(torch.cat([z, cb], 1))
            kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1).mean()
            loss = (rec - xb).pow(2).sum(1).mean() + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def sample(counts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(n_classes), counts)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            z = torch.randn((len(labels), LATENT), generator=gen)
            out = dec(torch.cat([z, torch.eye(n_classes)[torch.from_numpy(labels)]], 1)).numpy() + centres[labels]
        # Back to feature space; backbone features are ReLU6 outputs, so keep them in [0, 6].
        return np.clip(out * std + mean, 0.0, 6.0).astype(np.float32), labels

    return sample


def vae_augmenter(ratio: float, *, seed: int = 0) -> Callable[[np.ndarray, np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]:
    """augment(x, y, n_classes, seed) -> real rows + ratio x as many generated rows, per class."""

    def augment(x: np.ndarray, y: np.ndarray, n_classes: int, fold_seed: int):
        sample = fit_cvae(x, y, n_classes, seed=seed + fold_seed)
        counts = np.round(np.bincount(y, minlength=n_classes) * ratio).astype(int)
        gx, gy = sample(counts, seed + fold_seed + 1)
        return np.concatenate([x, gx]), np.concatenate([y, gy])

    return augment
