"""Nothing fxfeat does changes the user's model: parameters, buffers, training flags, outputs.

(Using the extractor acts on the model's objects it shares, by design: see tests/test_training.py.)"""

from __future__ import annotations

import pytest
import torch

import fxfeat
from tests.conftest import torchvision_model


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {name: m.training for name, m in model.named_modules()},
        {name: (p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()},
    )


def _assert_same(model, snapshot):
    state, flags, params = snapshot
    now = model.state_dict()
    assert state.keys() == now.keys()
    assert all(torch.equal(state[k], now[k]) for k in state)
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert params == {name: (p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("kwargs", [{}, {"mode": "unpooled"}, {"mode": "pooled", "num_classes": 3}])
def test_compile_leaves_the_model_untouched(kwargs):
    model = torchvision_model("resnet18").train()  # training mode on purpose: compile traces in eval mode
    model.layer2.eval()  # a mixed state must survive too
    x = torch.randn(2, 3, 224, 224)
    before = _snapshot(model)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    model.layer2.eval()
    extractor = fxfeat.compile(model, **kwargs)
    fxfeat.inspect(model)
    _assert_same(model, before)
    assert extractor.training  # the extractor follows the model's mode
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), expected)
