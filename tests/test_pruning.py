"""The extractor keeps only what the requested levels need, and costs no more than the truncated model."""

from __future__ import annotations

import torch
from torch import nn

import fxfeat
from benchmarks.timing import interleaved_latencies
from tests.conftest import torchvision_model


def test_unused_stages_are_gone():
    model = torchvision_model("resnet50")
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2))
    names = [name for name, _ in extractor.named_parameters()] + [name for name, _ in extractor.named_buffers()]
    assert names and not [n for n in names if n.split(".")[0] in ("layer3", "layer4", "fc")]
    modules = {name.split(".")[0] for name, _ in extractor.named_modules() if name}
    assert not modules & {"layer3", "layer4", "avgpool", "fc"}
    kept = sum(p.numel() for p in extractor.parameters())
    needed = sum(p.numel() for m in (model.conv1, model.bn1, model.layer1, model.layer2) for p in m.parameters())
    assert kept == needed


def _run_to_layer2(model: nn.Module) -> nn.Module:
    return nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2).eval()


def test_pruned_forward_is_as_fast_as_the_truncated_model():
    model = torchvision_model("resnet50")
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2)).eval()
    limit = _run_to_layer2(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x)[-1], limit(x))
    # Interleaved rounds so machine noise hits both alike; each keeps its best round.
    timings = interleaved_latencies({"extractor": extractor, "limit": limit}, x, rounds=3, min_run_time=0.5)
    extractor_time, limit_time = timings["extractor"].median, timings["limit"].median
    # "No slower", up to measurement noise on a shared 2-core machine.
    assert extractor_time <= limit_time * 1.10, (extractor_time, limit_time)
