"""``fxfeat.optimize_for_inference`` end to end (issue 13): outputs allclose to the extractor on a zoo subset at
several input sizes, layouts and dtypes; the model and the extractor untouched; inference-only behaviour; errors."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import fxfeat
from tests.conftest import timm_model, torchvision_model
from tests.helpers import as_list

# (builder, name, compile kwargs): CNNs with batch norms (plain and timm's BatchNormAct2d), ConvNeXt (layer norm,
# linear layers on channels-last maps, layer scale), squeeze-excitation, a ViT (tokens) and a Swin.
ZOO = [
    (torchvision_model, "resnet18", {}),
    (torchvision_model, "mobilenet_v3_small", {}),
    (torchvision_model, "convnext_tiny", {"out_indices": (0, 1)}),
    (timm_model, "efficientnet_b0", {}),
    (timm_model, "regnety_002", {}),
    (timm_model, "convnext_atto", {}),
    (timm_model, "vit_tiny_patch16_224", {"mode": "pooled"}),
    (timm_model, "swin_tiny_patch4_window7_224", {"out_indices": (0, 1)}),
]


def _randomise_norms(model: torch.nn.Module) -> None:
    """Batch norms with statistics other than (0, 1): folding them must matter."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _max_relative_error(actual, expected) -> float:
    worst = 0.0
    for a, e in zip(as_list(actual), as_list(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype
        worst = max(worst, ((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item())
    return worst


def _assert_allclose(actual, expected, rtol=1e-4) -> None:
    for a, e in zip(as_list(actual), as_list(expected)):
        torch.testing.assert_close(a.float(), e.float(), rtol=rtol, atol=rtol * e.abs().max().item())


@pytest.mark.parametrize("builder, name, kwargs", ZOO, ids=[name for _, name, _ in ZOO])
def test_optimized_outputs_match_the_extractor(builder, name, kwargs):
    model = builder(name).eval()
    _randomise_norms(model)
    extractor = fxfeat.compile(model, **kwargs).eval()
    errors = {}
    for channels_last in (None, False):
        fast = fxfeat.optimize_for_inference(extractor, channels_last=channels_last)
        assert fast.feature_info.channels() == extractor.feature_info.channels()
        for batch, size in ((1, (224, 224)), (3, (160, 192))):
            if "swin" in name or "vit" in name:  # fixed input size
                size = (224, 224)
            x = torch.randn(batch, 3, *size)
            with torch.no_grad():
                expected = extractor(x)
            actual = fast(x)
            _assert_allclose(actual, expected)
            errors[channels_last, batch] = _max_relative_error(actual, expected)
    print(f"{name}: max relative error {max(errors.values()):.2e}", fast.optimizations)


def test_the_model_and_the_extractor_are_untouched():
    model = torchvision_model("resnet18").eval()
    _randomise_norms(model)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    extractor = fxfeat.compile(model, out_indices=(1, 2)).eval()
    code = extractor.code
    fast = fxfeat.optimize_for_inference(extractor)
    assert fast.optimizations["fold_batch_norms"] > 0
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
    assert extractor.code == code and extractor.get_submodule("conv1") is model.conv1
    assert model.conv1.weight.is_contiguous() and type(model.bn1) is torch.nn.BatchNorm2d
    assert not any(p is q for p in fast.parameters() for q in model.parameters())


def test_inference_only_module():
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1,)).train()
    fast = fxfeat.optimize_for_inference(extractor)  # from an extractor in train mode: the eval graph
    assert isinstance(fast, fxfeat.InferenceGraphModule) and not fast.training
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(fxfeat.InvalidRequestError, match="cannot train"):
        fast.train()
    assert fast.eval() is fast
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = fast(x)[0]
    assert not out.requires_grad  # the forward runs without autograd
    assert extractor.training  # untouched
    _assert_allclose(fast(x), extractor.eval()(x))


def test_dtype_and_layout_conversions():
    extractor = fxfeat.compile(timm_model("convnext_atto"), out_indices=(1, 3)).eval()
    x = torch.randn(2, 3, 96, 96)
    reference = extractor(x)
    fast = fxfeat.optimize_for_inference(extractor, dtype=torch.bfloat16)
    assert fast.optimizations["dtype"] == "bfloat16"
    outputs = fast(x)  # float32 input, cast in the graph
    assert all(o.dtype == torch.bfloat16 for o in outputs)
    _assert_allclose(outputs, reference, rtol=5e-2)
    channels_last = fxfeat.optimize_for_inference(extractor, channels_last=True)
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in channels_last(x))
    plain = fxfeat.optimize_for_inference(extractor, channels_last=False)
    assert [o.stride() for o in plain(x)] == [o.stride() for o in reference]  # the extractor's own layout
    resnet = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1, 2)).eval()
    assert all(o.is_contiguous() for o in fxfeat.optimize_for_inference(resnet, channels_last=False)(x))


def test_layout_rule_picks_channels_last_for_convolutional_graphs_only():
    assert fxfeat.optimize_for_inference(fxfeat.compile(torchvision_model("resnet18"))).optimizations[
        "channels_last"]
    vit = fxfeat.compile(timm_model("vit_tiny_patch16_224"), mode="pooled")
    assert not fxfeat.optimize_for_inference(vit).optimizations["channels_last"]


def test_optimized_extractor_pickles_and_copies():
    extractor = fxfeat.compile(timm_model("convnext_atto"), mode="pooled").eval()
    fast = fxfeat.optimize_for_inference(extractor)
    x = torch.randn(2, 3, 64, 64)
    expected = fast(x)
    for twin in (pickle.loads(pickle.dumps(fast)), copy.deepcopy(fast)):
        assert isinstance(twin, fxfeat.InferenceGraphModule)
        assert twin.optimizations == fast.optimizations and twin.feature_info.channels() == [320]
        torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-5)


def test_optimized_graph_allocates_no_more_than_the_extractor():
    from benchmarks.measure import peak_memory_and_outputs

    extractor = fxfeat.compile(timm_model("convnext_atto"), out_indices=(3,)).eval()
    fast = fxfeat.optimize_for_inference(extractor, channels_last=False)
    x = torch.randn(2, 3, 128, 128)
    fast(x)  # the first call at a shape packs the weights of its oneDNN convolutions (kept, like weights)
    with torch.no_grad():
        extractor_peak = peak_memory_and_outputs(extractor, x)[0]
        fast_peak = peak_memory_and_outputs(fast, x)[0]
    assert fast_peak <= extractor_peak, (fast_peak, extractor_peak)


def test_compile_wraps_with_a_dynamic_batch():
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1,)).eval()
    compiled = fxfeat.optimize_for_inference(extractor, compile=True)
    assert compiled.feature_info.channels() == [64] and "fold_batch_norms" in compiled.optimizations
    for batch in (2, 3, 5):
        x = torch.randn(batch, 3, 64, 64)
        _assert_allclose(compiled(x), extractor(x))


def test_compile_settings_freeze_the_weights_and_specialise_each_batch():
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1,)).eval()
    settings = fxfeat.CompileSettings(freezing=True, dynamic=False)
    compiled = fxfeat.optimize_for_inference(extractor, compile=settings)
    assert compiled.optimizations["compile"] == {"mode": None, "freezing": True, "dynamic": False}
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (2, 3, 3):
        x = torch.randn(batch, 3, 64, 64)
        _assert_allclose(compiled(x), extractor(x))
    # warmed up at 224x224: 64x64 at batch 2 and at batch 3 are a static graph each, the second batch 3 reuses one
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 2
    with pytest.raises(fxfeat.InvalidRequestError, match="CompileSettings"):
        fxfeat.optimize_for_inference(extractor, compile="max-autotune")


def test_exports_name_the_optimized_module_and_point_to_the_extractor(tmp_path):
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1,)).eval()
    fast = fxfeat.optimize_for_inference(extractor)
    for export in (lambda: fxfeat.export.to_torchscript(fast), lambda: fxfeat.export.to_onnx(fast, tmp_path / "m")):
        with pytest.raises(fxfeat.ExportError, match="optimize_for_inference") as raised:
            export()
        assert "export the extractor" in str(raised.value)


def test_bad_requests_are_named():
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1,))
    with pytest.raises(fxfeat.InvalidModelError, match="extractor fxfeat compiled"):
        fxfeat.optimize_for_inference(torchvision_model("resnet18"))
    with pytest.raises(fxfeat.InvalidModelError, match="backbone.body"):
        fxfeat.optimize_for_inference(fxfeat.backbone(torchvision_model("resnet18")))
    with pytest.raises(fxfeat.InvalidRequestError, match="floating"):
        fxfeat.optimize_for_inference(extractor, dtype=torch.int8)
    with pytest.raises(fxfeat.InvalidRequestError, match="channels_last"):
        fxfeat.optimize_for_inference(extractor, channels_last="yes")


TORCHVISION_ZOO = ["alexnet", "densenet121", "efficientnet_v2_s", "googlenet", "inception_v3", "mnasnet1_0",
                   "mobilenet_v2", "regnet_y_400mf", "resnext50_32x4d", "shufflenet_v2_x1_0", "squeezenet1_1",
                   "vgg11_bn", "wide_resnet50_2", "maxvit_t", "swin_v2_t", "vit_b_16"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", TORCHVISION_ZOO)
def test_optimized_torchvision_zoo(name):
    model = torchvision_model(name).eval()
    _randomise_norms(model)
    extractor = fxfeat.compile(model).eval()
    fast = fxfeat.optimize_for_inference(extractor)
    size = extractor.input_size[1:]
    x = torch.randn(2, 3, *size)
    _assert_allclose(fast(x), extractor(x))
