"""Penultimate features: ``mode="unpooled"`` (timm's forward_features) and ``mode="pooled"`` (num_classes=0)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxfeat
from tests.conftest import timm_model, torchvision_model

# The seed examples of timm's guide: (model, input size, mode, expected shape).
SEED_EXAMPLES = [
    ("xception41", 299, "unpooled", [2, 2048, 10, 10]),
    ("resnet50", 224, "unpooled", [2, 2048, 7, 7]),
    ("densenet121", 224, "unpooled", [2, 1024, 7, 7]),
    ("resnet50", 224, "pooled", [2, 2048]),
    ("ese_vovnet19b_dw", 224, "pooled", [2, 1024]),
]

TIMM_MODELS = [
    "resnet50", "xception41", "densenet121", "ese_vovnet19b_dw", "efficientnet_b0", "mobilenetv3_large_100",
    "convnext_tiny", "regnety_032", "vit_tiny_patch16_224", "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
]
TORCHVISION_MODELS = [
    "resnet50", "densenet121", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "mobilenet_v3_large",
    "vgg11_bn", "vit_b_16", "swin_t",
]


@pytest.mark.parametrize("name, size, mode, shape", SEED_EXAMPLES)
def test_seed_examples(name, size, mode, shape):
    extractor = fxfeat.compile(timm_model(name), mode=mode).eval()
    with torch.no_grad():
        assert list(extractor(torch.randn(2, 3, size, size)).shape) == shape


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_equal_to_timm_forward_features_and_pre_logits(name):
    model = timm_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    # output_fmt="native": Swin's forward_features is channels-last, and fxfeat returns it as computed.
    unpooled = fxfeat.compile(model, mode="unpooled", output_fmt="native").eval()
    pooled = fxfeat.compile(model, mode="pooled").eval()
    with torch.no_grad():
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        # The extractors run the same ops on the same weights, so the results are bit-equal.
        assert torch.equal(unpooled(x), features)
        assert torch.equal(pooled(x), pre_logits)
    channel_dim = 1 if unpooled.feature_info[0]["fmt"] == "NCHW" else -1  # NHWC maps and NLC tokens: last
    assert unpooled.feature_info.channels() == [features.shape[channel_dim]]
    assert pooled.feature_info.channels() == [pre_logits.shape[1]]


def test_unpooled_channels_last_is_returned_nchw_by_default():
    model = timm_model("swin_tiny_patch4_window7_224")
    extractor = fxfeat.compile(model, mode="unpooled").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x), model.forward_features(x).permute(0, 3, 1, 2))
    assert extractor.feature_info[0]["fmt"] == "NCHW" and extractor.feature_info.reduction() == [32]


def _without_final_linear(model: nn.Module) -> nn.Module:
    """The model with its last nn.Linear (in registration order) replaced by nn.Identity()."""
    reference = copy.deepcopy(model)
    path = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)][-1]
    parent, _, child = path.rpartition(".")
    setattr(reference.get_submodule(parent), child, nn.Identity())
    return reference


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_pooled_equals_torchvision_without_its_final_linear(name):
    # For classifiers that stack several linears (VGG, MobileNetV3, EfficientNet's dropout + linear), the
    # pooled features are the input of the *final* linear: what the model computes with it replaced by Identity.
    model = torchvision_model(name)
    extractor = fxfeat.compile(model, mode="pooled").eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x), _without_final_linear(model)(x))
    assert not [n for n, m in extractor.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]


def test_new_classifier_head():
    model = timm_model("resnet50")
    torch.manual_seed(1)
    extractor = fxfeat.compile(model, mode="pooled", num_classes=10).eval()
    head = extractor.get_submodule("new_classifier")
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (2048, 10)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = head(model.forward_head(model.forward_features(x), pre_logits=True))
        assert torch.equal(extractor(x), expected)
    assert extractor.feature_info.channels() == [10]
    assert "fc.weight" not in dict(extractor.named_parameters())
    plain = fxfeat.compile(model, mode="pooled", num_classes=0)
    assert plain.feature_info.channels() == [2048]


def test_pruned_after_the_returned_node():
    model = torchvision_model("resnet50")
    unpooled = fxfeat.compile(model, mode="unpooled")
    assert {"avgpool", "fc"}.isdisjoint(name for name, _ in unpooled.named_children())
    pooled = fxfeat.compile(model, mode="pooled")
    assert "fc" not in dict(pooled.named_children())
    kept = sum(p.numel() for p in pooled.parameters())
    assert kept == sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in model.fc.parameters())


def test_inspect_shows_pool_and_classifier():
    report = fxfeat.inspect(torchvision_model("resnet18"))
    assert (report.head.global_pool, report.head.classifier) == ("avgpool", "fc")
    assert "global pool: avgpool" in str(report) and "final linear maps: fc" in str(report)


class _Segmenter(nn.Module):  # returns maps: no global pooling, no vector per image
    def __init__(self, classifier: bool = False):
        super().__init__()
        last = nn.Conv2d(8, 4, 1) if classifier else nn.Sequential(nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), last)

    def forward(self, x):
        return self.body(x)


def test_no_global_pool_or_vector_is_a_clear_error():
    for mode, missing in (("unpooled", "no global pooling"), ("pooled", "not one vector per image")):
        with pytest.raises(fxfeat.HeadNotFoundError) as caught:
            fxfeat.compile(_Segmenter(), mode=mode, input_size=(3, 64, 64))
        text = str(caught.value)
        assert missing in text and "mode='features'" in text and "levels=[...]" in text


def test_classifier_on_a_map_has_no_pooled_vector():
    # A 1x1 convolution classifying every position of the map, returned as a map: no global pooling before it.
    with pytest.raises(fxfeat.HeadNotFoundError, match="before any global pooling") as caught:
        fxfeat.compile(_Segmenter(classifier=True), mode="pooled", input_size=(3, 64, 64))
    assert "levels=[...]" in str(caught.value)


def test_classifier_before_an_activation_and_pooling_is_part_of_the_pooling():
    # SqueezeNet's classifier is a 1x1 conv on the last map, then a ReLU and the global pooling: the ReLU makes it
    # part of the pooling (docs/heads.md), so pooled is the model's own vector; unpooled is the map it reads.
    model = torchvision_model("squeezenet1_0")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        for mode in ("pooled", "embedding"):
            assert torch.equal(fxfeat.compile(model, mode=mode).eval()(x), model(x))
        assert torch.equal(fxfeat.compile(model, mode="unpooled").eval()(x), model.features(x))


def test_mode_argument_errors():
    model = torchvision_model("resnet18")
    for kwargs in (dict(mode="unpooled", out_indices=(1,)), dict(mode="features", num_classes=3),
                   dict(mode="pooled", num_classes=-1)):
        with pytest.raises(fxfeat.InvalidRequestError):
            fxfeat.compile(model, **kwargs)
