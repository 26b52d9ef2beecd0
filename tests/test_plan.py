"""The plan stage: the request's arguments checked (``out_indices``, ``levels``, ``output_stride``, ``input_size``,
``return_dict``), the levels named by the user or declared by the model, and the size the model is probed at."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfeat
from tests.conftest import timm_model, torchvision_model
from tests.helpers import assert_bit_equal_to_eager
from tests.helpers import raises_fxfeat_error as _raises


def test_out_indices_semantics(resnet18):
    every = fxfeat.compile(resnet18).feature_info
    assert every.out_indices == (0, 1, 2, 3, 4)
    assert fxfeat.compile(resnet18, out_indices=2).feature_info.out_indices == (3, 4)
    assert fxfeat.compile(resnet18, out_indices=(1, -1)).feature_info.out_indices == (1, 4)
    info = fxfeat.compile(resnet18, out_indices=(1, 3)).feature_info
    assert info.channels() == [64, 256] and info.reduction() == [4, 16] and len(info) == 5


def test_return_dict_keys_follow_module_names(resnet18):
    extractor = fxfeat.compile(resnet18, out_indices=(0, 4), return_dict=True).eval()
    with torch.no_grad():
        out = extractor(torch.randn(1, 3, 224, 224))
    assert list(out) == ["relu", "layer4"]
    assert_bit_equal_to_eager(resnet18, extractor, torch.randn(1, 3, 224, 224))


def test_levels_by_module_path_and_node_name(resnet18):
    extractor = fxfeat.compile(resnet18, levels=["layer2", "layer3_1_relu_1", "layer3.0"])
    info = extractor.feature_info
    assert info.module_name() == ["layer2", "layer3", "layer3.0"]
    assert info.channels() == [128, 256, 256] and info.reduction() == [8, 16, 16]
    assert_bit_equal_to_eager(resnet18, extractor, torch.randn(1, 3, 224, 224))


def test_input_size_defaults_to_the_model_config():
    model = timm_model("resnet50")
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, 160, 160))
    assert fxfeat.compile(model).feature_info.get("shape")[-1] == (2048, 5, 5)


def test_out_indices_out_of_range_lists_the_levels():
    model = torchvision_model("resnet18")
    text = _raises(fxfeat.OutIndicesError, fxfeat.compile, model, out_indices=(0, 5))
    assert "layer4" in text and "5 levels" in text
    _raises(fxfeat.OutIndicesError, fxfeat.compile, model, out_indices=(-6,))
    _raises(fxfeat.OutIndicesError, fxfeat.compile, model, out_indices=6)
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, out_indices="all")


def test_out_indices_out_of_order_or_repeated_are_refused():
    model = torchvision_model("resnet18")
    for indices in ((3, 1), (1, 1), (-1, 0)):
        text = _raises(fxfeat.OutIndicesError, fxfeat.compile, model, out_indices=indices)
        assert "increasing" in text
    assert fxfeat.compile(model, out_indices=(-4, -1)).feature_info.module_name() == ["layer1", "layer4"]


def test_unknown_level_name_suggests_close_names():
    model = torchvision_model("resnet18")
    text = _raises(fxfeat.UnknownLevelError, fxfeat.compile, model, levels=["layer5"])
    assert "layer4" in text


def test_the_same_level_twice_is_refused_and_dict_keys_stay_unique():
    model = torchvision_model("resnet18")
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, levels=["layer1", "layer1"])
    text = _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, levels=["layer1", "layer1_1_relu_1"])
    assert "same tensor" in text
    # Two different nodes of one module: one key per entry of feature_info.
    extractor = fxfeat.compile(model, levels=["layer1", "layer1_0_relu_1"], return_dict=True).eval()
    outputs = extractor(torch.randn(1, 3, 64, 64))
    assert len(outputs) == len(extractor.feature_info) == 2


def test_bad_arguments():
    model = torchvision_model("resnet18")
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, mode="everything")
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, input_size=(224, 224))
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, output_fmt="NHWC")
    _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, output_stride=4)


def test_integers_of_any_kind_are_accepted_where_a_user_means_an_int():
    import numpy as np

    model = torchvision_model("resnet18")
    reference = fxfeat.compile(model, out_indices=(1, 2), output_stride=16).feature_info
    for kwargs in (dict(out_indices=np.array([1, 2]), output_stride=16.0),
                   dict(out_indices=(np.int64(1), torch.tensor(2)), output_stride=np.int32(16))):
        info = fxfeat.compile(model, **kwargs).feature_info
        assert info.out_indices == reference.out_indices and info.reduction() == reference.reduction()
    assert fxfeat.compile(model, input_size=(np.int64(3), 64, 64)).feature_info.reduction() == [2, 4, 8, 16, 32]


def test_output_stride_must_be_a_whole_supported_value():
    model = torchvision_model("resnet18")
    for value in (16.5, True, "16", 4):
        text = _raises(fxfeat.InvalidRequestError, fxfeat.compile, model, output_stride=value)
        assert "output_stride must be None, 8, 16 or 32" in text


class _Declares(nn.Module):
    """A model with a timm-style feature_info, one of whose modules it does not have."""

    def __init__(self, missing_reduction: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.feature_info = [dict(module="bn_missing", reduction=missing_reduction, num_chs=8),
                             dict(module="stage", reduction=4, num_chs=16)]

    def forward(self, x):
        return self.stage(self.stem(x)).mean((2, 3))


def test_a_declared_module_missing_from_the_graph_takes_the_level_at_its_reduction():
    model = _Declares(missing_reduction=2).eval()
    with pytest.warns(fxfeat.FxFeatWarning, match="'bn_missing' \\(by 'stem'\\)"):
        extractor = fxfeat.compile(model, input_size=(3, 32, 32))
    assert extractor.feature_info.module_name() == ["stem", "stage"]
    assert_bit_equal_to_eager(model, extractor, torch.randn(1, 3, 32, 32))


def test_a_declared_level_that_cannot_be_placed_is_named():
    model = _Declares(missing_reduction=64).eval()
    text = _raises(fxfeat.DeclaredLevelError, fxfeat.compile, model, levels="declared", input_size=(3, 32, 32))
    assert "'bn_missing' (reduction 64)" in text and "levels='auto'" in text
    with pytest.warns(fxfeat.FxFeatWarning, match="Discovering the levels from the graph"):
        assert fxfeat.compile(model, input_size=(3, 32, 32)).feature_info.module_name() == ["stem", "stage"]
    _raises(fxfeat.DeclaredLevelError, fxfeat.compile, torchvision_model("resnet18"), levels="declared")


def test_a_vit_built_for_another_size_is_probed_at_its_own():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    extractor = fxfeat.compile(model).eval()
    x = torch.randn(1, 3, 64, 64)
    assert_bit_equal_to_eager(model, extractor, x)
    assert extractor.feature_info.get_dicts()[-1]["reduction"] == 16
