"""The level rule on structures other libraries use (issue 23): stages that keep the resolution (dilated), stages
that downsample at their end, flat block lists, functional ops between module calls, fully-convolutional heads.
Each on a small model built here, and on the library model where it was seen."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxfeat
from tests.helpers import assert_bit_equal_to_eager, assert_feature_info_matches


def _levels(model: nn.Module, **kwargs) -> list[tuple[str, int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxfeat.inspect(model.eval(), levels="auto", **kwargs)
    return [(level.module, level.reduction) for level in report.levels]


def test_dilated_stages_are_levels_as_with_output_stride():
    torch.manual_seed(0)
    dilated = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    assert _levels(dilated) == [("relu", 2), ("layer1", 4), ("layer2", 8), ("layer3", 8), ("layer4", 8)]
    plain = torchvision.models.resnet50().eval()
    plain.load_state_dict(dilated.state_dict())
    x = torch.randn(1, 3, 96, 128)
    ours = fxfeat.compile(dilated).eval()
    theirs = fxfeat.compile(plain, output_stride=8).eval()
    assert ours.feature_info.reduction() == theirs.feature_info.reduction() == [2, 4, 8, 8, 8]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ours(x), theirs(x)))
    assert_bit_equal_to_eager(dilated, ours, x)


class _Stage(nn.Module):
    """Blocks at one resolution, then (optionally) a 2x2 patch merging at its end, as Hugging Face's Swin."""

    def __init__(self, channels: int, depth: int, merge: bool):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU())
                                    for _ in range(depth))
        self.downsample = nn.Conv2d(channels, 2 * channels, 2, 2) if merge else None

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.downsample(x) if self.downsample is not None else x


class _EndDownsampling(nn.Module):
    def __init__(self, depths=(2, 1, 2, 2)):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.stages = nn.ModuleList(_Stage(8 * 2 ** i, depth, i < len(depths) - 1) for i, depth in enumerate(depths))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.embed(x)
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


def test_stages_that_downsample_at_their_end_give_the_map_before_the_merging():
    model = _EndDownsampling()
    assert [reduction for _, reduction in _levels(model)] == [4, 8, 16, 32]
    report = fxfeat.inspect(model, levels="auto")
    assert [level.module for level in report.levels] == ["stages.0.blocks.1", "stages.1.blocks.0",
                                                        "stages.2.blocks.1", "stages.3"]
    extractor = fxfeat.compile(model, levels="auto").eval()
    with torch.no_grad():
        outputs = extractor(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outputs] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]


def test_hugging_face_swin_levels_are_its_maps_before_each_merging():
    transformers = pytest.importorskip("transformers")
    config = transformers.SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[2, 1, 2, 2],
                                     num_heads=[1, 1, 2, 2], window_size=2)
    torch.manual_seed(0)
    model = transformers.SwinModel(config).eval()
    x = torch.randn(1, 3, 64, 64)
    extractor = fxfeat.compile(model, levels="auto").eval()
    with torch.no_grad():
        embedded, dimensions = model.embeddings(x)
        # what SwinBackbone returns, before its extra norms: each stage's map before its patch merging
        expected = model.encoder(embedded, dimensions, output_hidden_states=True,
                                 output_hidden_states_before_downsampling=True).reshaped_hidden_states[1:]
        ours = extractor(x)
    assert extractor.feature_info.reduction() == [4, 8, 16, 32]
    assert len(ours) == len(expected) == 4
    for output, reference in zip(ours, expected):
        assert torch.equal(output, reference)


class _Flat(nn.Module):
    """Blocks in one flat list at the root, a head convolution beside them (efficientnet_pytorch's layout)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.stem_bn = nn.BatchNorm2d(8)
        strides = [1, 2, 1, 2, 1, 2]
        channels = [8, 16, 16, 24, 24, 32]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())
            for cin, cout, stride in zip([8, *channels[:-1]], channels, strides))
        self.head = nn.Conv2d(32, 64, 1)
        self.head_bn = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = torch.relu(self.head_bn(self.head(x)))
        return self.fc(x.mean((2, 3)))


def test_a_flat_block_list_is_the_trunk_and_the_head_conv_is_head():
    assert _levels(_Flat()) == [("blocks.0", 2), ("blocks.2", 4), ("blocks.4", 8), ("blocks.5", 16)]


def test_efficientnet_pytorch_levels_are_its_endpoints():
    efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    model = efficientnet_pytorch.EfficientNet.from_name("efficientnet-b0").eval()
    extractor = fxfeat.compile(model).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        endpoints = list(model.extract_endpoints(x).values())
        ours = extractor(x)
    assert extractor.feature_info.channels()[-1] == 320
    assert [tuple(e.shape) for e in endpoints[:5]] == [tuple(o.shape) for o in ours]
    assert all(torch.equal(a, b) for a, b in zip(ours, endpoints[:5]))


class _Functional(nn.Module):
    """Activations applied as functions between module calls: ``x = torch.relu(self.down1(x))``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.down1 = nn.Conv2d(8, 16, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(16)
        self.down2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.relu(self.norm1(self.down1(x)) * 0.5)
        x = F.gelu(self.down2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_functional_ops_between_modules_belong_to_the_level():
    model = _Functional()
    report = fxfeat.inspect(model, levels="auto")
    assert [(level.module, level.node, level.reduction) for level in report.levels] == [
        ("stem", "relu", 2), ("norm1", "relu_1", 4), ("down2", "gelu", 8)]
    assert report.head.unpooled == "gelu"
    extractor = fxfeat.compile(model).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        relu_stem = F.relu(model.stem(x))
        relu_1 = torch.relu(model.norm1(model.down1(relu_stem)) * 0.5)
        gelu = F.gelu(model.down2(relu_1))
        assert all(torch.equal(a, b) for a, b in zip(extractor(x), (relu_stem, relu_1, gelu)))


class _ConvHead(nn.Module):
    """Test-time pooling with a fully-convolutional classifier, as pretrainedmodels' DPN: ``avg_pool2d(k, s=1)``,
    a 1x1 conv classifier, then an adaptive pool."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
        self.last_linear = nn.Conv2d(64, 10, 1)

    def forward(self, x):
        x = self.features(x)
        x = F.avg_pool2d(x, kernel_size=3, stride=1)
        x = self.last_linear(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def test_unpooled_stops_where_a_convolutional_head_begins():
    model = _ConvHead()
    report = fxfeat.inspect(model, levels="auto")
    assert report.head.unpooled == report.levels[-1].node == "features_5"
    extractor = fxfeat.compile(model, mode="unpooled").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(extractor(x), model.features(x))


def test_pretrainedmodels_dpn_test_time_pooling_unpooled_is_its_features():
    pretrainedmodels = pytest.importorskip("pretrainedmodels")
    torch.manual_seed(0)
    model = pretrainedmodels.dpn68(num_classes=1000, pretrained=None).eval()
    assert model.test_time_pool  # avg_pool2d(k=7, s=1), the 1x1 conv classifier, then an adaptive pool
    extractor = fxfeat.compile(model, mode="unpooled").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x), model.features(x))


class _InPlaceBetween(nn.Module):
    """``self.down(torch.relu_(x))``: an in-place activation as a function between module calls, then dropout."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.relu_(self.stage(self.stem(x)))
        return self.down(F.dropout(x, 0.1, self.training)).mean((2, 3))


def test_an_in_place_function_between_modules_is_the_level_and_dropout_is_not():
    model = _InPlaceBetween().eval()
    extractor = fxfeat.compile(model, input_size=(3, 64, 64), out_indices=(0,))
    entry = extractor.feature_info.get_dicts()[0]
    assert (entry["module"], entry["node"], entry["module_output"]) == ("stage", "relu_", False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(extractor.eval()(x)[0], torch.relu(model.stage(model.stem(x))))
    assert_bit_equal_to_eager(model, fxfeat.compile(model, input_size=(3, 64, 64)), x)


def _conv(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.BatchNorm2d(cout), nn.ReLU())


class _Exchange(nn.Module):
    """One HRNet stage: a block per branch, then every branch adds the others, resized to its resolution."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.ModuleList(_conv(c, c) for _ in range(3))
        self.down = nn.ModuleDict({"4to8": nn.Conv2d(c, c, 3, 2, 1), "8to16": nn.Conv2d(c, c, 3, 2, 1),
                                   "4to16": nn.Conv2d(c, c, 5, 4, 2)})

    def forward(self, x4, x8, x16):
        x4, x8, x16 = (block(x) + x for block, x in zip(self.blocks, (x4, x8, x16)))
        up = partial(F.interpolate, mode="nearest")
        return (x4 + up(x8, scale_factor=2.0) + up(x16, scale_factor=4.0),
                x8 + self.down["4to8"](x4) + up(x16, scale_factor=2.0),
                x16 + self.down["8to16"](x8) + self.down["4to16"](x4))


class _ParallelResolutions(nn.Module):
    """HRNet's layout: branches at reductions 4, 8 and 16 that exchange maps at every stage, then a head that
    widens each branch (``incre``), sums them from fine to coarse through strided convolutions (``down``), and a
    final 1x1 convolution before the pool. No map between the first branch and the last sum lies on every path."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv1, self.conv2 = _conv(3, c, 2), _conv(c, c, 2)
        self.transition = nn.ModuleList([_conv(c, c, 2), _conv(c, c, 2)])
        self.stages = nn.ModuleList(_Exchange(c) for _ in range(2))
        self.incre = nn.ModuleList(_conv(c, 2 * c) for _ in range(3))
        self.down = nn.ModuleList(_conv(2 * c, 2 * c, 2) for _ in range(2))
        self.final = _conv(2 * c, 4 * c, kernel=1)
        self.fc = nn.Linear(4 * c, 10)

    def forward(self, x):
        x4 = self.conv2(self.conv1(x))
        x8 = self.transition[0](x4)
        x16 = self.transition[1](x8)
        for stage in self.stages:
            x4, x8, x16 = stage(x4, x8, x16)
        y = self.incre[0](x4)
        y = self.incre[1](x8) + self.down[0](y)
        y = self.incre[2](x16) + self.down[1](y)
        return self.fc(self.final(y).mean((2, 3)))


class _Cell(nn.Module):
    """A NASNet cell: reads the two cells before it; a reduction cell halves both; a normal cell after a reduction
    halves the older input, still at the finer resolution."""

    def __init__(self, c: int, reduce: bool = False, older_finer: bool = False):
        super().__init__()
        self.left = _conv(c, c, 2 if reduce else 1)
        self.right = _conv(c, c, 2 if reduce or older_finer else 1)

    def forward(self, x, older):
        return torch.cat([self.left(x), self.right(older)], 1)[:, ::2]


class _TwoInputCells(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = _conv(3, c, 2)
        kinds = [dict(reduce=True), dict(older_finer=True), dict(), dict(reduce=True), dict(older_finer=True), dict(),
                 dict(reduce=True), dict(older_finer=True), dict()]
        self.cells = nn.ModuleList(_Cell(c, **kind) for kind in kinds)
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        older = x = self.stem(x)
        for cell in self.cells:
            x, older = cell(x, older), x
        return self.fc(F.relu(x).mean((2, 3)))


@pytest.mark.parametrize("build, expected", [
    (_ParallelResolutions, [("conv1", 2), ("incre.0", 4), ("incre.1", 8), ("final", 16)]),  # HRNet-like
    (_TwoInputCells, [("stem", 2), ("cells.2", 4), ("cells.5", 8), ("cells.8", 16)]),  # NASNet-like
])
def test_branches_that_mix_give_each_reduction_its_last_map(build, expected):
    torch.manual_seed(0)
    model = build().eval()
    assert _levels(model) == expected
    extractor = fxfeat.compile(model).eval()
    for x in (torch.randn(2, 3, 64, 64), torch.randn(1, 3, 96, 128)):
        assert_bit_equal_to_eager(model, extractor, x)
        assert_feature_info_matches(extractor, x)


def test_timm_hrnet_levels_are_its_incre_modules_and_the_final_layer():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False).eval()
    reference = timm.create_model("hrnet_w18_small", pretrained=False, features_only=True).eval()
    reference.load_state_dict(model.state_dict(), strict=False)
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2, 3, 4), levels="auto").eval()  # not its declared
    assert extractor.feature_info.module_name() == ["act1", "incre_modules.0", "incre_modules.1",
                                                    "incre_modules.2", "final_layer"]
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        ours, theirs = extractor(x), reference(x)
        assert all(torch.equal(a, b) for a, b in zip(ours[:4], theirs[:4]))  # timm's last is incre_modules.3
        assert torch.equal(ours[4], model.forward_features(x))


def test_pretrainedmodels_nasnet_levels_are_the_last_cell_before_each_reduction_cell():
    pretrainedmodels = pytest.importorskip("pretrainedmodels")
    torch.manual_seed(0)
    model = pretrainedmodels.nasnetamobile(num_classes=1000, pretrained=None).eval()
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2, 3, 4)).eval()
    assert extractor.feature_info.module_name() == ["conv0", "cell_stem_0", "cell_3", "cell_9", "cell_15"]
    assert_bit_equal_to_eager(model, extractor, torch.randn(1, 3, 224, 224))
