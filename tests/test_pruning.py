"""The extractor keeps only what the requested levels need, and costs no more than the truncated model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import benchmark

import fxfeat
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
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = torchvision_model("resnet50")
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2)).eval()
    limit = _run_to_layer2(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x)[-1], limit(x))
        timings = {"extractor": [], "limit": []}
        for _ in range(3):  # interleave the two so machine noise hits both alike
            for label, fn in (("extractor", extractor), ("limit", limit)):
                timer = benchmark.Timer("fn(x)", globals={"fn": fn, "x": x})
                timings[label].append(timer.blocked_autorange(min_run_time=0.5).median)
    extractor_time, limit_time = min(timings["extractor"]), min(timings["limit"])
    # "No slower", up to measurement noise on a shared 2-core machine.
    assert extractor_time <= limit_time * 1.10, (extractor_time, limit_time)
