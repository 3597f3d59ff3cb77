"""Backbones: every registered one is built, loads its ImageNet weights and recognises real photos."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.augment import eval_view
from toolkit.backbones import create_backbone, get_spec, list_backbones
from toolkit.backbones.efficientnet_lite import _same_pad
from toolkit.data import decode_images, discover
from toolkit.errors import EdgetuneError

torch = pytest.importorskip("torch")

ANT, BEE = 310, 309  # ImageNet class indices


@pytest.fixture(scope="module", params=list_backbones())
def backbone(request):
    return request.param, create_backbone(request.param, with_classifier=True)


def test_registry_lists_the_lite_family():
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(list_backbones())


def test_unknown_backbone_suggests_closest():
    with pytest.raises(EdgetuneError, match="Did you mean .efficientnet_lite"):
        get_spec("efficientnet_lite9")


def test_tf_same_padding_is_asymmetric_for_stride_two():
    # TF pads the extra pixel on the right/bottom; torch's symmetric padding would shift features.
    assert _same_pad(224, 3, 2) == (0, 1, 0, 1)
    assert _same_pad(56, 5, 2) == (1, 2, 1, 2)
    assert _same_pad(28, 3, 1) == (1, 1, 1, 1)


def test_spec_and_shapes(backbone):
    name, model = backbone
    spec = get_spec(name)
    assert spec.mean == (127.0, 127.0, 127.0) and spec.std == (128.0, 128.0, 128.0)
    assert not model.training, "backbones come back in eval mode so BatchNorm stays frozen"
    x = torch.zeros(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        assert model(x).shape == (2, spec.imagenet_classes)
        model.with_classifier = False
        assert model(x).shape == (2, spec.feature_dim)
        model.with_classifier = True


def test_tail_parameters_grow_with_blocks(backbone):
    _, model = backbone
    assert model.tail_parameters(0) == []
    assert 0 < len(model.tail_parameters(1)) < len(model.tail_parameters(2))


def test_imagenet_weights_recognise_ants_and_bees(backbone, hymenoptera):
    """Weights and preprocessing together: most real ant/bee photos get ImageNet ant or bee in the top 5."""
    name, model = backbone
    spec = get_spec(name)
    val = discover(hymenoptera).val
    images, _, _ = decode_images(val, min_side=round(spec.input_size / 0.875))
    x = np.stack([eval_view(im, spec.input_size) for im in images]).astype(np.float32)
    x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 32]) for i in range(0, len(x), 32)])
    top5 = logits.topk(5, dim=1).indices.numpy()
    hit = np.mean([(ANT in t) or (BEE in t) for t in top5])
    assert hit >= 0.9, f"{name}: only {hit:.2f} of val photos have ant/bee in the top 5"
