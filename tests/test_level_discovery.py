"""``levels="auto"`` finds, from the graph alone, the levels timm declares by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfeat
import fxfeat.trace.registries
from benchmarks.references import timm_feature_model
from tests.conftest import timm_model
from tests.helpers import assert_bit_equal_to_eager

TIMM_DECLARED = [
    "resnet50",
    "regnety_032",
    "resnest26d",
    "ecaresnet101d",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "densenet121",
    "convnext_tiny",
]


@pytest.mark.parametrize("name", TIMM_DECLARED)
def test_discovery_agrees_with_timm(name):
    model = timm_model(name)
    declared = [dict(entry) for entry in model.feature_info]
    del model.feature_info  # the answer must come from the graph
    info = fxfeat.compile(model, levels="auto").feature_info
    assert info.channels() == [entry["num_chs"] for entry in declared]
    assert info.reduction() == [entry["reduction"] for entry in declared]
    # Not required by timm's contract, but the structural naming lands on the same modules.
    assert info.module_name() == [entry["module"] for entry in declared]


def test_selective_kernel_branches_are_not_dilated_stages():
    # SKNet's bottleneck runs an undilated and a dilated 3x3 convolution side by side, and in skresnet50d the
    # last block's dilated branch is the last spatial convolution of the model: a dilation that no later
    # convolution goes below, yet one beside it does. It is no dilated stage, so layer4 is one level.
    model = timm_model("skresnet50d")
    del model.feature_info
    extractor = fxfeat.compile(model, levels="auto").eval()
    reference = timm_feature_model("skresnet50d", model)
    x = torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        ours, theirs = extractor(x), reference(x)
    assert extractor.feature_info.module_name() == reference.feature_info.module_name()
    assert extractor.feature_info.reduction() == reference.feature_info.reduction()
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


# Where timm's hand-written levels follow another convention than fxfeat's rule (docs/levels.md): the levels
# timm declares that fxfeat leaves out on purpose, by model.
TIMM_CONVENTION_DIFFERENCES = {
    # timm declares a map from inside VoVNet's stem, which goes on to halve the resolution with a convolution;
    # fxfeat treats such a stem as one unit, as timm itself does for most stems built that way.
    "ese_vovnet19b_dw": ["stem.1"],
}


@pytest.mark.parametrize("name", sorted(TIMM_CONVENTION_DIFFERENCES))
def test_discovery_differs_from_timm_only_by_the_documented_convention(name):
    model = timm_model(name)
    declared = [dict(entry) for entry in model.feature_info]
    del model.feature_info
    info = fxfeat.compile(model, levels="auto").feature_info
    kept = [entry for entry in declared if entry["module"] not in TIMM_CONVENTION_DIFFERENCES[name]]
    assert info.module_name() == [entry["module"] for entry in kept]
    assert info.reduction() == [entry["reduction"] for entry in kept]
    assert info.channels() == [entry["num_chs"] for entry in kept]


def test_inspect_reports_candidates_and_parameters():
    model = timm_model("efficientnet_b0")
    report = fxfeat.inspect(model, levels="auto")
    assert [level.module for level in report.levels] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]
    parameters = [level.parameters for level in report.levels]
    assert parameters == sorted(parameters) and parameters[-1] < report.total_parameters
    # the expansion conv of the next strided block is a candidate at the old reduction but not the level
    level = report.levels[1]
    assert level.node in level.candidates and len(level.candidates) > 1
    text = str(report)
    assert "blocks.4" in text and "params kept" in text


class _NormAct(nn.Module):
    """A norm traced through, whose unused dropout and activation are ``nn.Identity`` (as timm's norm-act
    layers are when built without them)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Identity()
        self.act = nn.Identity()

    def forward(self, x):
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        return self.act(self.drop(x))


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.norm = _NormAct(cout)

    def forward(self, x):
        return self.norm(self.conv(x))


def test_a_stage_returning_its_map_through_identities_is_the_level():
    model = nn.Sequential(_Stage(3, 8), _Stage(8, 16), _Stage(16, 32)).eval()
    extractor = fxfeat.compile(model, input_size=(3, 64, 64))
    assert extractor.feature_info.module_name() == ["0", "1", "2"]
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 48, 80))


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv3_large_100", "rexnet_100"])
def test_discovery_does_not_need_timms_registry(name, monkeypatch):
    # timm's registry of untraceable layers keeps its norm-act layers whole; traced through, they return their
    # map through identities, and the levels must not move.
    model = timm_model(name)
    del model.feature_info
    with_registry = fxfeat.compile(model, levels="auto").feature_info.module_name()
    monkeypatch.setattr(fxfeat.trace.registries, "READ_LIBRARY_REGISTRIES", False)
    assert fxfeat.compile(model, levels="auto").feature_info.module_name() == with_registry
