"""torchvision classification CNNs compile, are bit-equal to eager, and their feature_info is right.

The default suite runs a representative subset; ``make test-zoo`` runs every CNN of
``torchvision.models.list_models(module=torchvision.models)``.
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
    "mnasnet0_5", "shufflenet_v2_x0_5", "squeezenet1_0", "googlenet", "inception_v3", "alexnet",
]
# Transformers (patch embeddings, one resolution) are the subject of a later issue.
TRANSFORMERS = {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14", "swin_t", "swin_s", "swin_b",
                "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t"}
ALL_CNNS = [n for n in torchvision.models.list_models(module=torchvision.models) if n not in TRANSFORMERS]
# "Valid" (unpadded) convolutions lose pixels at every stage, so their maps are up to a few pixels smaller
# than ceil(H / reduction): SqueezeNet's 7x7 stem (224 -> 109) and Inception's stems (224 -> 109 -> 52...).
VALID_CONV_SLACK = {"squeezenet1_0": 3, "inception_v3": 4}
SIZES = [(224, 224), (256, 320)]


def check_model(name: str) -> None:
    model = torchvision_model(name)
    extractor = fxfeat.compile(model)
    assert len(extractor.feature_info) >= 4, extractor.feature_info
    reductions = extractor.feature_info.reduction()
    assert all(a < b for a, b in zip(reductions, reductions[1:])), reductions  # one level per reduction
    for height, width in SIZES:
        x = torch.randn(1, 3, height, width)
        assert_bit_equal_to_eager(model, extractor, x)
        assert_feature_info_matches(extractor, x, slack=VALID_CONV_SLACK.get(name, 1))


@pytest.mark.parametrize("name", CI_SUBSET)
def test_torchvision_subset(name):
    check_model(name)


@pytest.mark.zoo
@pytest.mark.parametrize("name", [n for n in ALL_CNNS if n not in CI_SUBSET])
def test_torchvision_zoo(name):
    check_model(name)


def test_subset_is_in_the_zoo():
    assert set(CI_SUBSET) <= set(ALL_CNNS)
    assert len(ALL_CNNS) + len(TRANSFORMERS) == len(torchvision.models.list_models(module=torchvision.models))
