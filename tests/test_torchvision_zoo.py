"""torchvision classification models compile, are bit-equal to eager, and their feature_info is right.

The default suite runs a representative subset; ``make test-zoo`` runs every model of
``torchvision.models.list_models(module=torchvision.models)``, transformers included.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import fxfeat
from tests.conftest import torchvision_model
from tests.helpers import assert_bit_equal_to_eager, assert_feature_info_matches

CI_SUBSET = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg11_bn", "densenet121", "mobilenet_v2",
    "mobilenet_v3_small", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny",
    "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3", "alexnet", "swin_t",
]
ALL_MODELS = torchvision.models.list_models(module=torchvision.models)
# Isotropic transformers: one level per encoder block, all at the patch size.
ISOTROPIC = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"}
# "Valid" (unpadded) convolutions lose pixels at every stage, so their maps are up to a few pixels smaller
# than ceil(H / reduction): SqueezeNet's 7x7 stem (224 -> 109) and Inception's stems (224 -> 109 -> 52...).
VALID_CONV_SLACK = {"squeezenet1_0": 3, "inception_v3": 4}
SIZES = [(224, 224), (256, 320)]


def _accepts(model, height: int, width: int) -> bool:
    """ViTs check the input size against their position embedding; MaxViT needs windows that tile the map."""
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, height, width))
    except Exception:
        return False
    return True


def check_model(name: str) -> None:
    model = torchvision_model(name)
    extractor = fxfeat.compile(model)
    levels = len(extractor.feature_info)
    assert levels >= 4, extractor.feature_info
    if len(extractor.feature_info.out_indices) < levels:  # an isotropic model returns its last blocks by default
        extractor = fxfeat.compile(model, out_indices=levels)
    reductions = extractor.feature_info.reduction()
    if name in ISOTROPIC:
        assert len(set(reductions)) == 1, reductions
    else:
        assert all(a < b for a, b in zip(reductions, reductions[1:])), reductions  # one level per reduction
    sizes = [size for size in SIZES if size == SIZES[0] or _accepts(model, *size)]
    for height, width in sizes:
        x = torch.randn(1, 3, height, width)
        assert_bit_equal_to_eager(model, extractor, x)
        assert_feature_info_matches(extractor, x, slack=VALID_CONV_SLACK.get(name, 1))


@pytest.mark.parametrize("name", CI_SUBSET)
def test_torchvision_subset(name):
    check_model(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in CI_SUBSET])
def test_torchvision_zoo(name):
    check_model(name)


def test_subset_is_in_the_zoo():
    assert set(CI_SUBSET) <= set(ALL_MODELS) and ISOTROPIC <= set(ALL_MODELS)
    assert len(ALL_MODELS) == 80
