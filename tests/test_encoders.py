"""Models that return their pyramid (segmentation encoders, torchvision's FPN backbone) and encoder-decoder nets
(U-Net, FPN, DeepLabV3+, torchvision's segmentation models): the levels are the returned maps, or the encoder's.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxfeat
from benchmarks.references import equal_maps
from tests.helpers import as_list, assert_bit_equal_to_eager

smp = pytest.importorskip("segmentation_models_pytorch")

ENCODERS = ["resnet18", "mobilenet_v2", "efficientnet-b0", "mit_b0", "densenet121", "vgg11", "tu-convnext_atto"]


def _returned_maps(encoder, x) -> list[torch.Tensor]:
    """What the encoder returns, without the input itself and the empty placeholders some encoders return for
    stages they do not have."""
    with torch.no_grad():
        features = encoder(x)
    return [f for f in features if f.numel() and not (f.shape == x.shape and torch.equal(f, x))]


@pytest.mark.parametrize("name", ENCODERS)
def test_encoder_levels_are_exactly_its_returned_maps(name):
    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder(name, weights=None).eval()
    extractor = fxfeat.compile(encoder).eval()
    for batch, size in ((2, (224, 224)), (1, (256, 320))):  # any batch and size: no shape check in the graph
        x = torch.randn(batch, 3, *size)
        expected = _returned_maps(encoder, x)
        with torch.no_grad():
            outputs = as_list(extractor(x))
        assert len(outputs) == len(expected)
        assert all(equal_maps(reference, output) for reference, output in zip(expected, outputs))


@pytest.mark.parametrize("architecture", ["Unet", "FPN", "DeepLabV3Plus"])
def test_encoder_decoder_levels_contain_the_encoder_stages(architecture):
    torch.manual_seed(0)
    model = getattr(smp, architecture)("resnet18", encoder_weights=None).eval()
    extractor = fxfeat.compile(model).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outputs = as_list(extractor(x))
    stages = _returned_maps(model.encoder, x)
    deepest_per_reduction = {tuple(stage.shape[-2:]): stage for stage in stages}  # DeepLabV3+ dilates layer4
    assert all(any(equal_maps(stage, output) for output in outputs) for stage in deepest_per_reduction.values())
    assert all(info["module"].startswith("encoder.") for info in extractor.feature_info.get_dicts())


@pytest.mark.parametrize("name, aux_loss", [("deeplabv3_resnet50", None), ("fcn_resnet50", None),
                                            ("deeplabv3_resnet50", True)])
def test_torchvision_segmentation_models_give_their_backbone_stages(name, aux_loss):
    # With aux_loss the model also returns a head on layer3: the levels still run to layer4.
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=aux_loss).eval()
    extractor = fxfeat.compile(model)
    assert extractor.feature_info.module_name() == ["backbone.relu", "backbone.layer1", "backbone.layer2",
                                                    "backbone.layer3", "backbone.layer4"]
    assert extractor.feature_info.reduction() == [2, 4, 8, 8, 8]  # layer3 and layer4 dilated: stages all the same
    assert_bit_equal_to_eager(model, extractor, torch.randn(1, 3, 224, 224))


def test_torchvision_fpn_backbone_levels_are_its_maps():
    torch.manual_seed(0)
    backbone = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone
    backbone.eval()
    extractor = fxfeat.compile(backbone, return_dict=True).eval()
    x = torch.randn(1, 3, 224, 288)
    with torch.no_grad():
        expected = backbone(x)
        outputs = extractor(x)
    assert list(outputs) == list(expected) == ["0", "1", "2", "3", "pool"]
    assert all(torch.equal(outputs[key], expected[key]) for key in expected)
    assert extractor.feature_info.reduction() == [4, 8, 16, 32, 64]
    assert extractor.feature_info.channels() == [256] * 5


def test_inspect_shows_the_decoder():
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    report = fxfeat.inspect(model)
    assert report.decoder == ("decoder", "segmentation_head")
    assert "decoder (after the encoder's levels): decoder, segmentation_head" in str(report)
    assert fxfeat.inspect(torchvision.models.resnet18()).decoder == ()


class _LogitsAndAuxiliaryMap(nn.Module):
    """A classifier that also returns an auxiliary map computed from its third stage."""

    def __init__(self, as_dict: bool = False):
        super().__init__()
        self.net = torchvision.models.resnet18()
        self.aux = nn.Conv2d(256, 5, 1)
        self.as_dict = as_dict

    def forward(self, x):
        net = self.net
        x = net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))
        c3 = net.layer3(x)
        logits = net.fc(torch.flatten(net.avgpool(net.layer4(c3)), 1))
        auxiliary = self.aux(c3)
        return {"logits": logits, "aux": auxiliary} if self.as_dict else (logits, auxiliary)


@pytest.mark.parametrize("as_dict", [False, True])
def test_logits_beside_an_auxiliary_map_keep_the_whole_model(as_dict):
    # The auxiliary output is a second sink: the levels, the pooling and the classifier are the main output's.
    torch.manual_seed(0)
    model = _LogitsAndAuxiliaryMap(as_dict).eval()
    report = fxfeat.inspect(model)
    assert [level.module for level in report.levels] == ["net.relu", "net.layer1", "net.layer2", "net.layer3",
                                                        "net.layer4"]
    assert (report.head.global_pool, report.head.classifier) == ("net_avgpool", "net_fc")
    assert report.decoder == ()
    x = torch.randn(2, 3, 160, 192)
    assert_bit_equal_to_eager(model, fxfeat.compile(model), x)
    net = model.net
    with torch.no_grad():
        unpooled = nn.Sequential(*list(net.children())[:-2])(x)
        pooled = torch.flatten(net.avgpool(unpooled), 1)
        assert torch.equal(fxfeat.compile(model, mode="unpooled")(x), unpooled)
        assert torch.equal(fxfeat.compile(model, mode="pooled")(x), pooled)


def test_inspect_shows_the_upsampling_after_the_backbone():
    model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None).eval()
    assert fxfeat.inspect(model).decoder == ("classifier", "interpolate")
