"""Unit tests of the analyses: reductions, layouts, data flow and dominance."""

from __future__ import annotations

import torch
from torch import nn

import fxfeat
from fxfeat.analyse import analyse
from fxfeat.analyse.shapes import reduction_of
from fxfeat.trace import trace_model
from tests.helpers import assert_bit_equal_to_eager


def test_reduction_is_a_power_of_two_robust_to_valid_convolutions():
    assert [reduction_of(s, 299) for s in (149, 147, 73, 71, 35, 17, 8)] == [2, 2, 4, 4, 8, 16, 32]
    assert [reduction_of(s, 224) for s in (112, 56, 28, 14, 7, 109, 5)] == [2, 4, 8, 16, 32, 2, 32]
    assert reduction_of(300, 224) == 1  # upsampled maps report no reduction


class _LayerScaleBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x):
        return x + self.gamma.reshape(1, -1, 1, 1) * self.conv(x)  # parameter-only subgraph: not data flow


class _ShapeUser(nn.Module):
    """Stages whose outputs dominate only if shape-derived tensors are not counted as data flow."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage1 = _LayerScaleBlock(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.stage2 = _LayerScaleBlock(16)
        self.token = nn.Parameter(torch.zeros(1, 1))
        self.head = nn.Linear(18, 5)

    def forward(self, x):
        token = self.token.expand(x.shape[0], -1)  # a parameter sized from the input's metadata
        zeros = x.new_zeros(x.shape[0], 1)  # a tensor built from the input's metadata
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(torch.cat([y.mean((2, 3)), token, zeros], dim=1))


def test_metadata_and_parameter_subgraphs_do_not_break_dominance():
    model = _ShapeUser().eval()
    analysis = analyse(trace_model(model), (3, 64, 64))
    assert [level.module for level in analysis.levels] == ["stage1", "stage2"]
    assert not analysis.dataflow.depends_on_input("expand")
    assert not analysis.dataflow.depends_on_input("new_zeros")
    extractor = fxfeat.compile(model, input_size=(3, 64, 64))
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 48, 80))


def test_fixed_size_maps_are_not_feature_maps():
    # torchvision's AlexNet pools to a fixed 6x6: at 224 that looks like a stride-32 map, but it is not.
    from tests.conftest import torchvision_model

    model = torchvision_model("alexnet")
    analysis = analyse(trace_model(model), (3, 224, 224))
    assert analysis.shapes["avgpool"].shape == (256, 6, 6) and analysis.shapes["avgpool"].fmt is None
    assert analysis.shapes["features_12"].fmt == "NCHW"
    assert analysis.levels[-1].node == "features_12"


def test_valid_convolutions_keep_their_levels():
    from benchmarks.references import eager_references
    from tests.conftest import torchvision_model

    model = torchvision_model("inception_v3")
    extractor = fxfeat.compile(model, input_size=(3, 299, 299))
    info = extractor.feature_info
    assert info.reduction() == [2, 4, 8, 16, 32]
    references = eager_references(model, info, torch.randn(1, 3, 299, 299))
    assert info.get("shape") == [tuple(reference.shape[1:]) for reference in references]


class _InPlaceResidual(nn.Module):
    """Blocks that write their sum in place: into the whole tensor, or into a slice of it (ReXNet)."""

    def __init__(self, channels, into_slice: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 2 if into_slice else channels, 3, padding=1)
        self.into_slice = into_slice

    def forward(self, x):
        out = self.conv(x)
        if self.into_slice:
            out[:, : x.shape[1]].add_(x)
        else:
            out.add_(x)
        return out


class _InPlaceNet(nn.Module):
    def __init__(self, into_slice: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block1 = _InPlaceResidual(8, into_slice)
        self.block2 = _InPlaceResidual(16 if into_slice else 8, into_slice)
        channels = 32 if into_slice else 8
        self.down = nn.Conv2d(channels, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU(inplace=True)  # writes into `down`'s output, the last level (a final act is head)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.act(self.down(x)).mean((2, 3))


def test_in_place_writes_are_new_versions_of_the_tensor():
    for into_slice in (False, True):
        model = _InPlaceNet(into_slice).eval()
        analysis = analyse(trace_model(model), (3, 64, 64))
        writes = [name for name in analysis.chain if analysis.aliases.is_write(name)]
        assert writes[:2] == ["add_", "add__1"], writes  # the writes are on the chain: every path reads them
        extractor = fxfeat.compile(model, input_size=(3, 64, 64))
        assert extractor.feature_info.module_name() == ["block2", "down"]
        assert extractor.feature_info.channels() == [32 if into_slice else 8, 16]
        assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 64, 64))


class _ReadThenOverwrite(nn.Module):
    """The next unit overwrites a level in place (its first layer, an in-place ReLU, as legacy Xception's blocks):
    the level is returned as the module returned it. (A function between module calls, ``self.down(x.relu_())``,
    would be part of the level: tests/test_level_structures.py.)"""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 8, 3, padding=1)
        self.down = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(8, 16, 3, stride=2, padding=1))

    def forward(self, x):
        x = self.stage(self.stem(x))
        return self.down(x).mean((2, 3))


def test_a_level_written_later_is_returned_as_computed():
    model = _ReadThenOverwrite().eval()
    extractor = fxfeat.compile(model, input_size=(3, 64, 64), out_indices=(0,))
    assert extractor.feature_info.module_name() == ["stage"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.stage(model.stem(x))
        assert (expected < 0).any()  # the later relu_ would change it
        assert torch.equal(extractor(x)[0], expected)
    # Both levels: the first is copied before the write, the write itself still feeds the second.
    extractor = fxfeat.compile(model, input_size=(3, 64, 64))
    assert [node.target for node in extractor.graph.nodes if node.op == "call_method"].count("clone") == 1
    with torch.no_grad():
        first, second = extractor(x)
        assert torch.equal(first, expected) and torch.equal(second, model.down(torch.relu(expected)))


class _TinyUNet(nn.Module):
    """An encoder-decoder: the decoder upsamples and concatenates the encoder's maps, so only the input and the
    decoder's last layers lie on every input-to-output path."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.enc3 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.dec2 = nn.Conv2d(32 + 16, 16, 3, padding=1)
        self.dec1 = nn.Conv2d(16 + 8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up(e3), e2], 1))
        d1 = self.dec1(torch.cat([self.up(d2), e1], 1))
        return self.head(self.up(d1))


def test_a_decoder_does_not_hide_the_encoder_pyramid():
    model = _TinyUNet().eval()
    extractor = fxfeat.compile(model, input_size=(3, 64, 64))
    assert extractor.feature_info.module_name() == ["enc1", "enc2", "enc3"]
    assert extractor.feature_info.reduction() == [2, 4, 8]
    assert_bit_equal_to_eager(model, extractor, torch.randn(1, 3, 96, 80))


class _FixedSizeMaps(nn.Module):
    """A model of one input size only (one probe) whose maps read as a grid in both layouts: 16x16 maps of 12
    channels at 64 pixels, where 12 (or 16 beside 12) passes as a side shrunk by "valid" convolutions."""

    def __init__(self, channels_last: bool):
        super().__init__()
        self.channels_last = channels_last
        self.stem = nn.Conv2d(3, 12, 4, stride=4)
        self.down = nn.Conv2d(12, 24, 2, stride=2)

    def forward(self, x):
        torch._assert(x.shape[-1] == 64, "this model takes 64x64 images only")
        x = self.stem(x)
        first = x.permute(0, 2, 3, 1) if self.channels_last else x
        return [first, self.down(x)]


def test_one_probe_reads_each_layout_where_both_read_as_a_grid():
    for channels_last in (False, True):
        model = _FixedSizeMaps(channels_last).eval()
        extractor = fxfeat.compile(model, input_size=(3, 64, 64))
        info = extractor.feature_info
        assert info.channels() == [12, 24] and info.reduction() == [4, 8]
        assert [entry["native_fmt"] for entry in info.get_dicts()] == ["NHWC" if channels_last else "NCHW", "NCHW"]
        x = torch.randn(2, 3, 64, 64)
        first, second = model(x)
        outputs = extractor(x)
        outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
        assert torch.equal(outputs[0], first.permute(0, 3, 1, 2) if channels_last else first)
        assert torch.equal(outputs[1], second)


def test_swin_of_narrow_stages_at_its_one_size_is_read_channels_last():
    """timm's Swin takes one input size; at embed_dim 32 its 56x56x32 first stage read as a 56x32 grid of 56
    channels (found drawing it with fxfeat.plot). Its levels now equal timm's features_only maps."""
    from benchmarks.references import as_list, equal_maps, timm_feature_model
    from tests.conftest import timm_model

    kwargs = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    model = timm_model("swin_tiny_patch4_window7_224", **kwargs)
    reference = timm_feature_model("swin_tiny_patch4_window7_224", model, **kwargs)
    extractor = fxfeat.compile(model)
    assert extractor.feature_info.channels() == [32, 64, 128, 256]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        outputs, expected = as_list(extractor(x)), as_list(reference(x))
    assert [tuple(output.shape) for output in outputs] == [(1, 32, 56, 56), (1, 64, 28, 28), (1, 128, 14, 14),
                                                           (1, 256, 7, 7)]
    assert all(equal_maps(a, b) for a, b in zip(expected, outputs))
    assert_bit_equal_to_eager(model, extractor, x)
