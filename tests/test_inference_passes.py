"""Inference passes, each on small graphs (issue 13)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fxfeat
from fxfeat.passes.fold_batch_norm import fold_batch_norms


class _ConvNormTwice(nn.Module):
    """A conv + norm folded; a shared conv called twice and a conv read by two nodes are not."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.norm_a = nn.BatchNorm2d(8)
        self.norm_b = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 8, 1)
        self.norm_c = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.norm(self.conv(x)).relu()
        x = self.norm_a(self.shared(x)) + self.norm_b(self.shared(x))
        y = self.head(x)
        return (self.norm_c(y) + y).mean((2, 3))


def _randomise_statistics(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))


def test_fold_batch_norms_folds_only_single_use_layers_and_keeps_outputs():
    model = _ConvNormTwice().eval()
    _randomise_statistics(model)
    extractor = fxfeat.compile(model, input_size=(3, 16, 16), mode="unpooled").eval()
    folded = copy.deepcopy(extractor)
    assert fold_batch_norms(folded) == 1  # only conv + norm: `shared` is called twice, `head` read twice
    remaining = [node.target for node in folded.graph.nodes if node.op == "call_module"]
    assert "norm" not in remaining and {"norm_a", "norm_b", "norm_c"} <= set(remaining)
    x = torch.randn(2, 3, 20, 24)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), extractor(x), rtol=1e-4, atol=1e-5)
    assert isinstance(model.norm, nn.BatchNorm2d) and extractor.get_submodule("norm") is model.norm  # untouched
