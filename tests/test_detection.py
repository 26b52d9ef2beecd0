"""End to end: torchvision's detectors and a segmentation head on ``fxfeat.backbone`` of a timm and a torchvision
model: a training step (finite loss, backward, an optimizer step that changes the model's own weights) and an
eval forward returning detections."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import fxfeat
from tests.conftest import timm_model, torchvision_model

BACKBONES = {
    "torchvision-resnet18": lambda: torchvision_model("resnet18"),
    "timm-convnext_atto": lambda: timm_model("convnext_atto", drop_path_rate=0.2),
}
DETECTORS = {
    "FasterRCNN": lambda body: FasterRCNN(body, num_classes=3, min_size=128, max_size=160),
    "RetinaNet": lambda body: RetinaNet(body, num_classes=3, min_size=128, max_size=160),
    "MaskRCNN": lambda body: MaskRCNN(body, num_classes=3, min_size=128, max_size=160),
}


def _images_and_targets(with_masks: bool):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 120, 150, generator=generator), torch.rand(3, 140, 110, generator=generator)]
    targets = []
    for image in images:
        boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [30.0, 20.0, 100.0, 60.0]])
        target = {"boxes": boxes, "labels": torch.tensor([1, 2])}
        if with_masks:
            masks = torch.zeros(2, *image.shape[1:], dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
                mask[y0:y1, x0:x1] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


def _first_weight(model: nn.Module) -> torch.Tensor:
    return next(p for p in model.parameters() if p.dim() == 4)


@pytest.mark.parametrize("backbone_name", list(BACKBONES))
@pytest.mark.parametrize("detector_name", list(DETECTORS))
def test_detector_trains_and_detects_on_an_fxfeat_backbone(detector_name, backbone_name):
    model = BACKBONES[backbone_name]()
    # RetinaNet as torchvision builds it: the last three levels and P6, P7; the others: four levels and a max pool.
    retina = dict(out_indices=3, extra_blocks=LastLevelP6P7(64, 64)) if detector_name == "RetinaNet" else {}
    body = fxfeat.backbone(model, fpn_channels=64, **retina)
    assert body.out_channels == 64 and len(body.feature_info.out_indices) == (3 if retina else 4)
    detector = DETECTORS[detector_name](body).train()
    images, targets = _images_and_targets(with_masks=detector_name == "MaskRCNN")
    weight = _first_weight(model)
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01)
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    assert not torch.equal(weight, before)  # the model's own weights are trained
    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    expected = {"boxes", "labels", "scores"} | ({"masks"} if detector_name == "MaskRCNN" else set())
    assert set(detections[0]) == expected
    assert detections[0]["boxes"].shape[1] == 4


def test_fcos_and_a_whole_detector_saved_and_loaded():
    body = fxfeat.backbone(torchvision_model("resnet18"), fpn_channels=32, out_indices=(2, 3, 4),
                           extra_blocks=LastLevelP6P7(32, 32))
    detector = FCOS(body, num_classes=3, min_size=128, max_size=160).train()
    images, targets = _images_and_targets(with_masks=False)
    loss = sum(detector(images, targets).values())
    loss.backward()
    assert math.isfinite(loss.item())
    detector.eval()
    copy_ = pickle.loads(pickle.dumps(detector)).eval()  # a detector holding an fxfeat backbone saves whole
    with torch.no_grad():
        first, second = detector(images), copy_(images)
    assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(first, second))


class _Segmenter(nn.Module):
    """An FCN/DeepLab-style segmenter: a DeepLab head on the last level, sized from ``feature_info``."""

    def __init__(self, body: fxfeat.Backbone, num_classes: int):
        super().__init__()
        self.body = body
        self.head = DeepLabHead(body.feature_info.channels()[-1], num_classes)

    def forward(self, x):
        last = list(self.body(x).values())[-1]
        return F.interpolate(self.head(last), size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("backbone_name", list(BACKBONES))
def test_segmentation_head_sized_from_feature_info_trains(backbone_name):
    model = BACKBONES[backbone_name]()
    segmenter = _Segmenter(fxfeat.backbone(model, output_stride=16 if "resnet" in backbone_name else None), 4)
    assert isinstance(segmenter.body.out_channels, int)
    segmenter.train()
    x = torch.rand(2, 3, 96, 128)
    labels = torch.randint(0, 4, (2, 96, 128))
    weight = _first_weight(model)
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(segmenter.parameters(), lr=0.01)
    loss = F.cross_entropy(segmenter(x), labels)
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item()) and not torch.equal(weight, before)
    with torch.no_grad():
        assert segmenter.eval()(x).shape == (2, 4, 96, 128)


def test_backbone_arguments():
    model = torchvision_model("resnet18")
    plain = fxfeat.backbone(model)
    assert plain.out_channels == 512 and list(plain(torch.randn(1, 3, 64, 64))) == ["0"]
    several = fxfeat.backbone(model, out_indices=(2, 3))
    assert several.out_channels == [128, 256]
    wrapped = fxfeat.backbone(fxfeat.compile(model, out_indices=(3, 4), return_dict=True), fpn_channels=16,
                              extra_blocks=None)
    maps = wrapped(torch.randn(1, 3, 64, 64))
    assert list(maps) == ["0", "1"] and [m.shape[1] for m in maps.values()] == [16, 16]
    with pytest.raises(fxfeat.InvalidRequestError, match="mode"):
        fxfeat.backbone(model, mode="pooled")
    with pytest.raises(fxfeat.InvalidRequestError, match="already compiled"):
        fxfeat.backbone(fxfeat.compile(model), out_indices=(1,))
    frozen = fxfeat.freeze(fxfeat.backbone(model, fpn_channels=16), up_to=1)  # a backbone's body is frozen
    assert not frozen.get_submodule("layer1.0.conv1").weight.requires_grad
