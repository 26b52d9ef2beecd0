"""The public API: out_indices, return_dict, levels=[...], output_fmt, FeatureInfo, inspect, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfeat
from tests.conftest import timm_model
from tests.helpers import assert_bit_equal_to_eager


def test_feature_info_matches_timm_semantics():
    from timm.models._features import FeatureInfo as TimmFeatureInfo

    entries = [dict(num_chs=c, reduction=r, module=f"m{i}") for i, (c, r) in enumerate([(8, 2), (16, 4), (32, 8)])]
    ours, theirs = fxfeat.FeatureInfo(entries, (0, 2)), TimmFeatureInfo([dict(e) for e in entries], (0, 2))
    for accessor in ("channels", "reduction", "module_name"):
        for idx in (None, 1, [0, 1]):
            assert getattr(ours, accessor)(idx) == getattr(theirs, accessor)(idx)
    assert len(ours) == len(theirs)
    assert ours.get_dicts(keys=["num_chs"]) == theirs.get_dicts(keys=["num_chs"])
    assert ours[1]["module"] == theirs[1]["module"]


def test_entries_carry_node_fmt_and_shape(resnet18):
    entry = fxfeat.compile(resnet18).feature_info.get_dicts()[2]
    assert entry["node"] == "layer2_1_relu_1" and entry["fmt"] == "NCHW" and entry["shape"] == (128, 28, 28)


class _Stage(nn.Module):  # channels-last residual block: NHWC in, NHWC out
    def __init__(self, channels):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.mlp = nn.Linear(channels, channels)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _Down(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 2, stride=2)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.stages = nn.Sequential(_Stage(8), _Down(8, 16), _Stage(16), _Down(16, 32), _Stage(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stages(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


def test_channels_last_levels_are_detected_and_returned_nchw_or_native():
    model = _ChannelsLastNet().eval()
    x = torch.randn(2, 3, 96, 128)
    nchw = fxfeat.compile(model, input_size=(3, 96, 96))
    assert nchw.feature_info.module_name() == ["stages.0", "stages.2", "stages.4"]
    assert nchw.feature_info.channels() == [8, 16, 32] and nchw.feature_info.reduction() == [4, 8, 16]
    assert nchw.feature_info.get("fmt") == ["NCHW"] * 3
    native = fxfeat.compile(model, input_size=(3, 96, 96), output_fmt="native")
    assert native.feature_info.get("fmt") == ["NHWC"] * 3
    assert native.feature_info.get("shape")[0] == (24, 24, 8) and nchw.feature_info.get("shape")[0] == (8, 24, 24)
    with torch.no_grad():
        for a, b in zip(nchw.eval()(x), native.eval()(x)):
            assert torch.equal(a, b.permute(0, 3, 1, 2))
    assert_bit_equal_to_eager(model, nchw, x)


@pytest.mark.parametrize("name, size", [("resnet18", (97, 131)), ("vit_tiny_patch16_224", (224, 224))])
def test_a_model_built_for_other_input_channels_is_probed_with_them(name, size):
    model = timm_model(name, in_chans=1)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)  # timm keeps the 3-channel config
    extractor = fxfeat.compile(model, out_indices=(-1,))
    assert extractor.input_size == (1, 224, 224) and fxfeat.inspect(model).input_size == (1, 224, 224)
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 1, *size))
    with pytest.raises(fxfeat.ShapePropagationError, match=r"takes 1 input channels: pass input_size=\(1, 224, 224\)"
                       ) as raised:
        fxfeat.compile(model, input_size=(3, 224, 224))  # a size the user gives is used as given
    assert raised.value.input_channels == 1


def test_extractor_is_a_graph_module_that_survives_deepcopy(resnet18):
    import copy

    extractor = fxfeat.compile(resnet18, out_indices=(1,))
    assert isinstance(extractor, torch.fx.GraphModule)
    clone = copy.deepcopy(extractor)
    assert isinstance(clone, fxfeat.FeatureGraphModule) and clone.feature_info.channels() == [64]


