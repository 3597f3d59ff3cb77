"""Small classifier heads trained on frozen-backbone features.

linear, mlp (linear-ReLU-linear), and prior: a linear layer plus the backbone's own ImageNet
classifier (frozen buffers), a softmax and a second linear layer (toolkit.head_fit's "prior").
Every head standardises its input with statistics of the training features (stored as buffers,
so they travel with the weights into every export): ReLU6-pooled features sit far from zero mean,
and AdamW with weight decay converges much faster on standardised inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEAD_KINDS = ("linear", "mlp", "prior")
MIN_FEATURE_STD = 1e-2  # features are ReLU6 outputs in [0, 6]; typical std is ~0.5


def create_head(
    kind: str,
    in_dim: int,
    n_classes: int,
    *,
    hidden: int = 256,
    dropout: float = 0.2,
    feature_mean: np.ndarray | None = None,
    feature_std: np.ndarray | None = None,
    prior_classes: int = 1000,
):
    import torch
    from torch import nn

    class Frozen(nn.Module):
        """A linear layer held in buffers: exported with the head, never trained (ORT training
        artifacts make parameters trainable, buffers not)."""

        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.register_buffer("weight", torch.zeros(cout, cin))
            self.register_buffer("bias", torch.zeros(cout))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            mean = torch.zeros(in_dim) if feature_mean is None else torch.as_tensor(feature_mean, dtype=torch.float32)
            std = torch.ones(in_dim) if feature_std is None else torch.as_tensor(feature_std, dtype=torch.float32)
            self.register_buffer("feature_mean", mean)
            # A (nearly) dead channel carries nothing a linear head can use, but 1/std would reach
            # 1e5 and overflow an fp16 export: floor the scale so the head stays fp16-safe.
            self.register_buffer("feature_inv_std", 1.0 / std.clamp(min=MIN_FEATURE_STD))
            if kind in ("linear", "prior"):
                self.layers = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
                if kind == "prior":
                    self.prior = Frozen(in_dim, prior_classes)
                    self.prior_out = nn.Linear(prior_classes, n_classes, bias=False)
            elif kind == "mlp":
                self.layers = nn.Sequential(
                    nn.Dropout(dropout),
                    nn.Linear(in_dim, hidden),
                    nn.ReLU(inplace=True),
                    nn.Dropout(dropout),
                    nn.Linear(hidden, n_classes),
                )
            else:
                from toolkit.errors import EdgetuneError

                raise EdgetuneError(f"Unknown head '{kind}'. Use one of: {', '.join(HEAD_KINDS)}.")

        def forward(self, features):
            x = (features - self.feature_mean) * self.feature_inv_std
            if kind == "prior":
                return self.layers(x) + self.prior_out(torch.softmax(self.prior(x), dim=1))
            return self.layers(x)

    return Head()


def head_from_config(cfg: dict[str, Any], in_dim: int, n_classes: int, prior_classes: int = 1000):
    return create_head(cfg["head"], in_dim, n_classes, hidden=cfg["hidden"], dropout=cfg["dropout"],
                       prior_classes=prior_classes)


def decay_groups(module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay weight matrices only, never biases or norm parameters."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def numpy_head(state: dict[str, np.ndarray], kind: str):
    """The trained head as a numpy function (features -> logits): inference without torch."""

    from toolkit.head_fit import HeadParams, head_logits

    params = HeadParams(kind, state, kind)
    return lambda features: head_logits(params, features)
