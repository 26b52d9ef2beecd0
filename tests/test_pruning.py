"""The extractor keeps only what the requested levels need, and costs no more than the truncated model."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fxfeat
from benchmarks.timing import paired_latency_ratio
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


class _KernelCounter(TorchDispatchMode):
    """Counts the ATen kernels a call dispatches, in-place and out-of-place variants as one (``add_`` as ``add``)."""

    def __init__(self):
        super().__init__()
        self.kernels: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.kernels[func.overloadpacket.__name__.rstrip("_")] += 1
        return func(*args, **(kwargs or {}))


def _kernels(fn, x: torch.Tensor) -> Counter[str]:
    counter = _KernelCounter()
    with torch.no_grad(), counter:
        fn(x)
    return counter.kernels


def test_pruned_forward_runs_exactly_the_truncated_models_kernels():
    model = torchvision_model("resnet50")
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2)).eval()
    limit = _run_to_layer2(model)
    x = torch.randn(1, 3, 224, 224)
    kernels = _kernels(extractor, x)
    assert kernels == _kernels(limit, x)
    assert kernels["convolution"] == 24  # stem 1, (3 + 4) bottlenecks x 3, 2 downsamples: nothing past layer2


def test_pruned_forward_is_as_fast_as_the_truncated_model():
    model = torchvision_model("resnet50")
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2)).eval()
    limit = _run_to_layer2(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(extractor(x)[-1], limit(x))
    # The same kernels (test above), so what is timed here is fxfeat's own per-call cost. Calls are timed in
    # back-to-back pairs so a slow spell of this shared 2-core machine hits both; its ratio still varies by about
    # 10% between measurements, so a measurement above the bound is repeated: a real cost fails every attempt.
    ratios = []
    for _ in range(3):
        ratios.append(paired_latency_ratio(extractor, limit, x))
        if ratios[-1] <= 1.15:
            break
    assert ratios[-1] <= 1.15, ratios
