"""``output_stride``: the dilation rewrite against torchvision's and timm's own dilated models."""

from __future__ import annotations

import pytest
import torch

import fxfeat
from benchmarks.references import timm_feature_model
from tests.conftest import timm_model, torchvision_model
from tests.helpers import as_list, assert_feature_info_matches


def _torchvision_trunk(model: torch.nn.Module) -> torch.nn.Module:
    """A torchvision ResNet up to layer4 (no pooling, no fc)."""
    return torch.nn.Sequential(*list(model.children())[:-2]).eval()


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("output_stride, dilate", [(8, [False, True, True]), (16, [False, False, True])])
def test_equal_to_torchvision_replace_stride_with_dilation(name, output_stride, dilate):
    model = torchvision_model(name)
    reference = torchvision_model(name, replace_stride_with_dilation=dilate)
    reference.load_state_dict(model.state_dict())
    extractor = fxfeat.compile(model, output_stride=output_stride, out_indices=(-1,)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x)[0], _torchvision_trunk(reference)(x))
    assert extractor.feature_info.reduction() == [output_stride]


def test_seed_example_ecaresnet101d():
    model = timm_model("ecaresnet101d")
    extractor = fxfeat.compile(model, output_stride=8, out_indices=(2, 4)).eval()
    assert extractor.feature_info.channels() == [512, 2048]
    assert extractor.feature_info.reduction() == [8, 8]
    x = torch.randn(2, 3, 320, 320)
    reference = timm_feature_model("ecaresnet101d", model, output_stride=8, out_indices=(2, 4))
    with torch.no_grad():
        outputs, expected = extractor(x), reference(x)
    assert [list(o.shape) for o in outputs] == [[2, 512, 40, 40], [2, 2048, 40, 40]]
    assert all(torch.equal(a, b) for a, b in zip(outputs, expected))


TIMM_CASES = [
    ("resnet50", 16), ("regnety_032", 8), ("efficientnet_b0", 16), ("mobilenetv3_large_100", 8),
    ("convnext_tiny", 16), ("cspdarknet53", 16),
]


@pytest.mark.parametrize("name, output_stride", TIMM_CASES)
def test_equal_to_timm_output_stride(name, output_stride):
    model = timm_model(name)
    extractor = fxfeat.compile(model, output_stride=output_stride).eval()
    reference = timm_feature_model(name, model, output_stride=output_stride)
    assert extractor.feature_info.reduction() == reference.feature_info.reduction()
    assert extractor.feature_info.channels() == reference.feature_info.channels()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        outputs, expected = extractor(x), reference(x)
    assert len(outputs) == len(expected)
    for level, (a, b) in enumerate(zip(outputs, expected)):
        assert torch.equal(a, b), f"level {level}"


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0", "regnet_y_400mf", "densenet121",
                                  "convnext_tiny", "vgg11_bn"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_torchvision_models_run_dilated(name, output_stride):
    model = torchvision_model(name)
    native = fxfeat.compile(model).eval()
    dilated = fxfeat.compile(model, output_stride=output_stride).eval()
    native_reductions = native.feature_info.reduction()
    assert dilated.feature_info.reduction() == [min(r, output_stride) for r in native_reductions]
    for size in [(224, 224), (256, 320)]:
        x = torch.randn(1, 3, *size)
        assert_feature_info_matches(dilated, x)
        with torch.no_grad():
            for reduction, a, b in zip(native_reductions, as_list(native(x)), as_list(dilated(x))):
                if reduction <= output_stride:  # levels below the requested stride are untouched
                    assert torch.equal(a, b)


def test_penultimate_modes_with_output_stride():
    model = timm_model("resnet50")
    unpooled = fxfeat.compile(model, mode="unpooled", output_stride=16).eval()
    pooled = fxfeat.compile(model, mode="pooled", output_stride=16).eval()
    reference = timm_model("resnet50", output_stride=16)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        features = reference.forward_features(x)
        assert torch.equal(unpooled(x), features)
        assert torch.equal(pooled(x), reference.forward_head(features, pre_logits=True))
    assert unpooled.feature_info.reduction() == [16] and unpooled.feature_info[0]["shape"] == (2048, 14, 14)


def test_transformer_raises_a_clear_error():
    with pytest.raises(fxfeat.OutputStrideError) as caught:
        fxfeat.compile(timm_model("vit_tiny_patch16_224"), output_stride=8)
    text = str(caught.value)
    # the patch embedding now yields more tokens than the position embedding has: the add fails
    assert "output_stride=8" in text and "no longer runs" in text and "node 'add'" in text
    assert "Hint:" in text and "output_stride=None" in text


def test_the_model_keeps_its_strides():
    model = torchvision_model("resnet50")
    strides = {name: (m.stride, getattr(m, "dilation", None), m.padding) for name, m in model.named_modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))}
    extractor = fxfeat.compile(model, output_stride=8)
    assert strides == {name: (m.stride, getattr(m, "dilation", None), m.padding) for name, m in model.named_modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.MaxPool2d))}
    assert extractor.get_submodule("layer4.0.conv2").stride == (1, 1)
    assert extractor.get_submodule("layer4.1.conv2").dilation == (4, 4)
    assert model.layer4[1].conv2.dilation == (1, 1)


def test_native_output_stride_changes_nothing():
    model = torchvision_model("resnet18")
    native, same = fxfeat.compile(model), fxfeat.compile(model, output_stride=32)
    assert native.code == same.code


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pointwise_ops_stay_undilated(one_thread):
    # A 1x1 convolution with dilation 2 computes the same values, but single-threaded CPU kernels for it sum in
    # another order than the 1x1 fast path: timm and torchvision keep 1x1 ops at dilation 1, and so must fxfeat.
    model = timm_model("resnet50")
    extractor = fxfeat.compile(model, output_stride=8, out_indices=(-1,)).eval()
    assert extractor.get_submodule("layer4.0.downsample.0").dilation == (1, 1)
    reference = timm_feature_model("resnet50", model, output_stride=8, out_indices=(-1,))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x)[0], reference(x)[0])


def test_patch_merging_is_named_in_the_error():
    # Swin lowers the resolution by reshaping 2x2 patches into channels: no stride to remove.
    with pytest.raises(fxfeat.OutputStrideError, match=r"layers\.3\.downsample") as caught:
        fxfeat.compile(timm_model("swin_tiny_patch4_window7_224"), output_stride=16)
    assert "from reduction 16 to 32" in str(caught.value)
