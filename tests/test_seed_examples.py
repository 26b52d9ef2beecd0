"""The feature-pyramid examples of timm's feature-extraction guide, reproduced with random weights."""

from __future__ import annotations

import pytest
import torch

import fxfeat
from tests.conftest import timm_model
from tests.helpers import assert_bit_equal_to_eager


@pytest.mark.parametrize("levels", [None, "auto"])
def test_resnest26d_pyramid(levels):
    model = timm_model("resnest26d")
    extractor = fxfeat.compile(model, levels=levels).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        shapes = [list(o.shape) for o in extractor(x)]
    assert shapes == [[2, 64, 112, 112], [2, 256, 56, 56], [2, 512, 28, 28], [2, 1024, 14, 14], [2, 2048, 7, 7]]
    assert_bit_equal_to_eager(model, extractor, x)


@pytest.mark.parametrize("levels", [None, "auto"])
def test_regnety_032_pyramid(levels):
    model = timm_model("regnety_032")
    extractor = fxfeat.compile(model, levels=levels).eval()
    assert extractor.feature_info.channels() == [32, 72, 216, 576, 1512]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        shapes = [list(o.shape) for o in extractor(x)]
    assert shapes == [[2, 32, 112, 112], [2, 72, 56, 56], [2, 216, 28, 28], [2, 576, 14, 14], [2, 1512, 7, 7]]
    assert_bit_equal_to_eager(model, extractor, x)


def test_default_levels_follow_the_declared_feature_info():
    model = timm_model("regnety_032")
    extractor = fxfeat.compile(model)
    assert extractor.feature_info.module_name() == [entry["module"] for entry in model.feature_info]
