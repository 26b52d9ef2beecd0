"""Bad input gets an FxFeatError subclass with a hint, never an internal AssertionError or KeyError."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxfeat
from tests.conftest import torchvision_model
from tests.helpers import assert_bit_equal_to_eager
from tests.helpers import raises_fxfeat_error as _raises


def test_not_a_module():
    text = _raises(fxfeat.InvalidModelError, fxfeat.compile, "resnet50")
    assert "str" in text


def test_torchscript_and_exported_modules_are_refused_with_the_way_out():
    model = torchvision_model("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(model)
    for entry in (fxfeat.compile, fxfeat.inspect):
        assert "TorchScript" in _raises(fxfeat.InvalidModelError, entry, scripted)
    # torch.export's module refuses .eval(): it used to leak torch's NotImplementedError.
    exported = torch.export.export(model, (torch.randn(1, 3, 64, 64),)).module()
    assert "to_exported_program" in _raises(fxfeat.InvalidModelError, fxfeat.compile, exported)


@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel], ids=["torch.compile", "DataParallel"])
def test_torch_wrappers_compile_the_module_they_hold(wrap):
    # torch.compile's wrapper failed to trace (no Python forward of its own); DataParallel's traced into a wrong
    # graph. Both now compile the wrapped module, sharing its parameters, with a warning that says so.
    model = torchvision_model("resnet18")
    with pytest.warns(fxfeat.FxFeatWarning, match=r"model\.(_orig_mod|module)"):
        extractor = fxfeat.compile(wrap(model), out_indices=(1, 3)).eval()
    assert extractor.feature_info.module_name() == ["layer1", "layer3"]
    assert next(extractor.parameters()).data_ptr() == next(model.parameters()).data_ptr()
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 64, 64))


def test_model_without_feature_maps():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 64), nn.ReLU(), nn.Linear(64, 10))
    text = _raises(fxfeat.NoFeatureMapsError, fxfeat.compile, mlp, input_size=(3, 32, 32))
    assert "Sequential" in text


class _DataDependentRoot(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        if x.mean() > 0:  # Python control flow on a tensor value: torch.fx cannot trace it
            x = -x
        return self.conv(x)


def test_untraceable_forward_names_the_model_and_the_error():
    text = _raises(fxfeat.TraceFailedError, fxfeat.compile, _DataDependentRoot())
    assert "_DataDependentRoot" in text and "forward()" in text and "control flow" in text


class _Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x


class _ModelWithUntraceableBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.gate = _Gate()
        self.stage = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stage(self.gate(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_untraceable_submodule_is_made_opaque_and_named():
    model = _ModelWithUntraceableBlock().eval()
    with pytest.warns(fxfeat.FxFeatWarning, match=r"_ModelWithUntraceableBlock\.gate \(_Gate\)"):
        extractor = fxfeat.compile(model, input_size=(3, 64, 64))
    assert extractor.feature_info.module_name() == ["gate", "stage"]
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 64, 64))
    report = fxfeat.inspect(model, input_size=(3, 64, 64))
    assert "gate" in report.opaque_modules


def test_no_internal_exceptions_leak():
    model = torchvision_model("resnet18")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kwargs in (dict(levels=["nope"]), dict(out_indices=(9,)), dict(levels=[""])):
            with pytest.raises(fxfeat.FxFeatError):
                fxfeat.compile(model, **kwargs)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x, y):
        return self.conv(x) + self.conv(y)


def test_a_forward_with_two_required_inputs_is_named_with_a_wrapping_hint():
    text = _raises(fxfeat.InvalidModelError, fxfeat.compile, _TwoInputs())
    assert "_TwoInputs.forward(x, y)" in text and "wrap" in text


class _MaskedStem(nn.Module):
    """An optional argument that changes the path (hiera's ``mask=None``): traced at its default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.down(self.conv(x)).mean((2, 3))


def test_optional_forward_arguments_are_traced_at_their_defaults():
    model = _MaskedStem().eval()
    extractor = fxfeat.compile(model, input_size=(3, 32, 32))
    assert extractor.feature_info.module_name() == ["conv", "down"]
    assert_bit_equal_to_eager(model, extractor, torch.randn(1, 3, 40, 24))


def test_a_probe_too_small_to_resolve_the_levels_is_refused():
    model = torchvision_model("resnet18")
    text = _raises(fxfeat.ProbeTooSmallError, fxfeat.compile, model, input_size=(3, 16, 16))
    assert "input_size (3, 16, 16)" in text and "1x1" in text and "larger input_size" in text
    assert fxfeat.compile(model, input_size=(3, 64, 64)).feature_info.reduction() == [2, 4, 8, 16, 32]


def test_backbone_fpn_channels_must_be_a_positive_int():
    model = torchvision_model("resnet18")
    for value in (0, -4, "256", 2.5):
        text = _raises(fxfeat.InvalidRequestError, fxfeat.backbone, model, fpn_channels=value)
        assert "fpn_channels" in text


def test_a_vit_called_at_a_size_its_position_embedding_does_not_fit_gets_its_own_check():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    extractor = fxfeat.compile(model).eval()
    text = _raises(fxfeat.InputShapeError, extractor, torch.randn(1, 3, 256, 256))
    assert "Input height (256) doesn't match model (224)" in text and "Proxy" not in text
    text = _raises(fxfeat.InputShapeError, extractor, torch.randn(1, 1, 224, 224))
    assert "3 channels" in text


def test_a_hugging_face_model_keeps_its_channel_check():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    model = transformers.ResNetModel(config).eval()
    extractor = fxfeat.compile(model).eval()
    text = _raises(fxfeat.InputShapeError, extractor, torch.randn(1, 1, 64, 64))
    assert "3 channels" in text
