"""The compile-time passes one by one, and the driver every pass runs through (fxfeat/passes/driver.py). The
inference passes have theirs in tests/test_inference.py."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from torch import nn

from fxfeat.analyse import analyse
from fxfeat.errors import RewriteError
from fxfeat.passes import (
    attach_classifier,
    bind_optional_inputs,
    dilate,
    expose_outputs,
    remove_dead_code,
    snapshot_outputs,
)
from fxfeat.passes.convert_layout import convert_layout
from fxfeat.passes.driver import run_passes, with_plan
from fxfeat.plan import make_plan, make_request
from fxfeat.plan.plan import NEW_CLASSIFIER
from fxfeat.trace import trace_model


def _planned(model: nn.Module, **request):
    model = model.eval()
    made = make_request(model, **request)
    traced = trace_model(model)
    plan = make_plan(analyse(traced, made.input_size), made)
    return traced, plan, fx.GraphModule(traced.graph_module, copy.deepcopy(traced.graph))


def test_expose_outputs_then_remove_dead_code_leave_only_what_the_levels_need():
    traced, plan, module = _planned(torchvision.models.resnet18(), out_indices=(1,))
    changed = run_passes(module, [with_plan(expose_outputs, plan), with_plan(remove_dead_code, plan)])
    assert changed["expose_outputs"] == 1 and changed["remove_dead_code"] > 0
    assert not any(node.target == "fc" for node in module.graph.nodes)
    x = torch.randn(1, 3, 64, 64)
    model = traced.root
    with torch.no_grad():
        expected = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
        assert torch.equal(module(x)[0], expected)


class _ReluAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        y = self.down(x)
        x.relu_()  # written after the level was read
        return y + x.mean()


def test_snapshot_outputs_returns_a_level_as_it_was_before_a_later_write():
    model = _ReluAfter()
    _, plan, module = _planned(model, levels=["conv", "down"])
    run_passes(module, [with_plan(expose_outputs, plan), with_plan(remove_dead_code, plan)])
    assert run_passes(module, [with_plan(snapshot_outputs, plan)])["snapshot_outputs"] == 1
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x)[0], model.conv(x))  # not relu'd


def test_attach_classifier_installs_a_new_head_on_the_pooled_features():
    _, plan, module = _planned(torchvision.models.resnet18(), mode="pooled", num_classes=7)
    assert run_passes(module, [with_plan(attach_classifier, plan)]) == {"attach_classifier": 1}
    head = module.get_submodule(NEW_CLASSIFIER)
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (512, 7)


def test_dilate_replaces_layers_by_edited_copies_and_leaves_the_models_alone():
    model = torchvision.models.resnet18()
    _, plan, module = _planned(model, output_stride=16)
    edited = {edit.target for edit in plan.op_edits if edit.target}
    assert run_passes(module, [with_plan(dilate, plan)])["dilate"] == len(plan.op_edits) > 0
    for target in edited:
        assert module.get_submodule(target) is not model.get_submodule(target)
    assert model.layer4[0].conv2.dilation == (1, 1) and module.get_submodule("layer4.0.conv2").dilation in (2, (2, 2))


def test_convert_layout_converts_the_input_at_the_start():
    module = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert run_passes(module, [lambda m: convert_layout(m, channels_last=False, dtype=None)]) == {"<lambda>": 0}
    assert run_passes(module, [lambda m: convert_layout(m, channels_last=True, dtype=torch.float64)])
    out = module(torch.randn(1, 3, 8, 8))
    assert out.dtype == torch.float64 and out.is_contiguous(memory_format=torch.channels_last)


class _OptionalInputs(nn.Module):
    def forward(self, x, scale=2.0, *args, offset=1.0, **kwargs):
        return x * scale + offset


class _RequiredSecondInput(nn.Module):
    def forward(self, x, y):
        return x + y


def test_bind_optional_inputs_gives_each_optional_input_its_default_and_keeps_required_ones():
    module = fx.symbolic_trace(_OptionalInputs())
    assert bind_optional_inputs(module) == 4  # scale, *args, offset, **kwargs
    module.recompile()
    [image] = [node for node in module.graph.nodes if node.op == "placeholder"]
    assert image.name == "x" and image.type is torch.Tensor
    x = torch.randn(2, 3)
    assert torch.equal(module(x), _OptionalInputs()(x))
    required = fx.symbolic_trace(_RequiredSecondInput())
    assert bind_optional_inputs(required) == 0
    assert [node.name for node in required.graph.nodes if node.op == "placeholder"] == ["x", "y"]


def test_the_driver_names_the_pass_that_failed():
    def broken(module):
        raise KeyError("boom")

    module = fx.symbolic_trace(nn.ReLU())
    with pytest.raises(RewriteError, match="Rewrite pass broken failed: KeyError"):
        run_passes(module, [broken])


def test_the_driver_refuses_an_invalid_graph_naming_the_passes():
    def dangling(module):
        stranger = fx.Graph().placeholder("z")  # a node of another graph
        module.graph.call_function(torch.relu, (stranger,))
        return 1

    with pytest.raises(RewriteError, match=r"left by passes \['dangling'\] is invalid"):
        run_passes(fx.symbolic_trace(nn.ReLU()), [dangling])
