"""Inference passes (issue 13), each on small graphs: what it rewrites, what it must leave alone, and that the
outputs stay those of the extractor."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxfeat
from fxfeat.optimize import inference_copy
from fxfeat.passes.driver import run_passes
from fxfeat.passes.fold_batch_norm import fold_batch_norms
from fxfeat.passes.fuse_onednn import fuse_residual_sums, use_onednn
from fxfeat.passes.in_place import restore_in_place
from fxfeat.passes.inline_norms import inline_norm_layers
from fxfeat.passes.remove_no_ops import remove_no_ops
from fxfeat.runtime.in_place import add_in_place
from fxfeat.runtime.onednn import OneDNNConv2d, OneDNNConv2dAdd, OneDNNLinear


def _run(pass_, module) -> int:
    """What ``pass_`` changed in ``module``, run through the driver (which lints and recompiles)."""
    return run_passes(module, [pass_])[pass_.__name__]


def _randomise_statistics(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.randn(module.num_features, generator=generator))
            module.bias.data.copy_(torch.randn(module.num_features, generator=generator))


def _prepared(model: nn.Module, input_size=(3, 16, 16), **compile_kwargs):
    """The eval extractor of ``model`` and an inference copy with shapes recorded (as optimize_for_inference
    prepares it)."""
    model.eval()
    _randomise_statistics(model)
    extractor = fxfeat.compile(model, input_size=input_size, **compile_kwargs).eval()
    module = inference_copy(extractor)
    ShapeProp(module).propagate(torch.randn(2, *input_size))
    return extractor, module


def _traced(model: nn.Module, input_size=(3, 16, 16)):
    """``model`` in eval mode and ``torch.fx.symbolic_trace`` of a copy of it, shapes recorded: the passes work
    on any GraphModule."""
    model.eval()
    _randomise_statistics(model)
    module = torch.fx.symbolic_trace(copy.deepcopy(model))
    ShapeProp(module).propagate(torch.randn(2, *input_size))
    return model, module


def _assert_same_outputs(module, extractor, x, rtol=1e-4, atol=1e-5):
    with torch.no_grad():
        expected, actual = extractor(x), module(x)
    expected = expected if isinstance(expected, (list, tuple)) else [expected]
    actual = actual if isinstance(actual, (list, tuple)) else [actual]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


# --- batch-norm folding ----------------------------------------------------------------------------------------

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


def test_fold_batch_norms_folds_only_single_use_layers_and_keeps_outputs():
    model = _ConvNormTwice()
    extractor, folded = _prepared(model, mode="unpooled")
    assert _run(fold_batch_norms, inference_copy(extractor)) == 1  # without recorded shapes too
    assert _run(fold_batch_norms, folded) == 1  # only conv + norm: `shared` is called twice, `head` read twice
    remaining = [node.target for node in folded.graph.nodes if node.op == "call_module"]
    assert "norm" not in remaining and {"norm_a", "norm_b", "norm_c"} <= set(remaining)
    _assert_same_outputs(folded, extractor, torch.randn(2, 3, 20, 24))
    assert isinstance(model.norm, nn.BatchNorm2d) and extractor.get_submodule("norm") is model.norm  # untouched
    assert extractor.get_submodule("conv") is model.conv and folded.get_submodule("conv") is not model.conv


def test_folding_math_matches_the_formula():
    model, folded = _traced(nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3)), (2, 8, 8))
    conv, norm = model
    assert _run(fold_batch_norms, folded) == 1
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    layer = folded.get_submodule("0")
    torch.testing.assert_close(layer.weight, conv.weight * scale.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(layer.bias, norm.bias - norm.running_mean * scale)


def test_sync_batch_norm_folds_in_eval():
    model, module = _traced(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    assert _run(fold_batch_norms, module) == 1
    _assert_same_outputs(module, model, torch.randn(2, 3, 12, 12))


class _LinearNorm(nn.Module):
    def __init__(self, tokens: bool):
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4, 6) if not tokens else nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6 if not tokens else 4)

    def forward(self, x):
        x = self.stem(x)
        x = x.mean((2, 3)) if not self.tokens else x.flatten(2)[:, :, :5]
        return self.norm(self.fc(x))


def test_linear_batch_norm_folded_on_rows_only():
    model, module = _traced(_LinearNorm(tokens=False), input_size=(3, 12, 12))
    assert _run(fold_batch_norms, module) == 1
    _assert_same_outputs(module, model, torch.randn(3, 3, 12, 12))
    # (N, C, L): the norm normalises C, the layer writes L; nothing to fold
    _, module = _traced(_LinearNorm(tokens=True), input_size=(3, 12, 12))
    assert _run(fold_batch_norms, module) == 0


def test_functional_batch_norm_of_a_library_norm_is_inlined_then_folded():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_small_050")  # timm's BatchNormAct2d: batch_norm -> drop -> act
    extractor, module = _prepared(model, input_size=(3, 64, 64), out_indices=(0, 1))
    norms = [n.target for n in module.graph.nodes if n.op == "call_module"
             and isinstance(module.get_submodule(n.target), timm.layers.BatchNormAct2d)]
    assert _run(inline_norm_layers, module) == len(norms) > 0
    assert sum(node.target is F.batch_norm for node in module.graph.nodes) == len(norms)
    assert _run(remove_no_ops, module) >= len(norms)  # each norm's `drop` (nn.Identity)
    assert _run(fold_batch_norms, module) == len(norms)  # despite each norm's own `x.ndim == 4` check reading the conv
    assert not any(node.target is F.batch_norm for node in module.graph.nodes)
    _assert_same_outputs(module, extractor, torch.randn(2, 3, 80, 72))
    assert type(extractor.get_submodule(norms[0])) is timm.layers.BatchNormAct2d  # the extractor is untouched


class _UntraceableNorm(nn.BatchNorm2d):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: fx cannot trace it
            return super().forward(x)
        return super().forward(x) * 2


def test_a_norm_whose_body_cannot_be_traced_stays_a_call():
    block = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), _UntraceableNorm(4), nn.Conv2d(4, 4, 3, stride=2))
    extractor, module = _prepared(block, levels=["1", "2"])
    assert any(n.op == "call_module" and n.target == "1" for n in module.graph.nodes)  # kept whole by the tracer
    assert _run(inline_norm_layers, module) == 0
    assert _run(fold_batch_norms, module) == 0  # a subclass may compute something else
    _assert_same_outputs(module, extractor, torch.randn(2, 3, 16, 16))


# --- no-op removal -------------------------------------------------------------------------------------------------

class _NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.identity = nn.Identity()
        self.dropout = nn.Dropout(0.5)
        self.dropout2d = nn.Dropout2d(0.5)

    def forward(self, x):
        x = self.dropout2d(self.identity(self.conv(x)))
        x = F.dropout(x, 0.3, training=self.training) + 1
        x = F.dropout(x, 0.3, training=True)  # dropout on purpose, even in eval: kept
        return self.dropout(x)


def test_remove_no_ops_removes_identity_and_eval_dropouts_only():
    extractor, module = _traced(_NoOps())
    assert _run(remove_no_ops, module) == 4
    remaining = [node for node in module.graph.nodes if node.op in ("call_module", "call_function")]
    assert [node.target for node in remaining if node.op == "call_module"] == ["conv"]
    assert sum(node.target is F.dropout for node in remaining) == 1
    torch.manual_seed(0)
    expected = extractor(torch.ones(1, 3, 8, 8))
    torch.manual_seed(0)
    torch.testing.assert_close(module(torch.ones(1, 3, 8, 8)), expected)


# --- in-place restoring --------------------------------------------------------------------------------------------

class _Reads(nn.Module):
    """Values read once (may be overwritten) and read twice (may not)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.SiLU()
        self.scale = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        a = self.conv(x)
        b = F.relu(a)  # `a` is read again below: never overwritten
        c = self.conv2(b) + a  # a sum whose first operand nobody reads later: written in place
        d = torch.sigmoid(c)  # `c` read later: out of place
        e = self.act(self.conv2(d)) + self.scale  # the SiLU's input is read once: in place
        f = e + c  # `e` read once, `c` read once more (its last read)
        g = x.relu()  # the input is never overwritten
        return f, g.mean((1, 2, 3)), e[:, :1] * 1  # `e`: read after `f` is computed, so `f` writes into `c`


def test_in_place_never_overwrites_a_value_read_later_the_input_or_a_parameter():
    model, module = _traced(_Reads(), input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    rewritten = _run(restore_in_place, module)
    nodes = {node.name: node for node in module.graph.nodes}
    assert nodes["relu"].kwargs.get("inplace") is not True  # a is read by the sum
    assert nodes["sigmoid"].target is torch.sigmoid  # c is read by the last sum
    assert nodes["relu_1"].target == "relu"  # the input
    assert module.act.inplace is True  # the SiLU's input (conv2_1) is read once
    sums = {name: node.args for name, node in nodes.items() if node.target is add_in_place}
    assert [arg.name for arg in sums["add"]] == ["conv2", "conv"]
    assert [arg.name for arg in sums["add_1"]] == ["act", "scale"]  # into the SiLU's output, not the parameter
    assert [arg.name for arg in sums["add_2"]] == ["add", "add_1"]  # into c, not into e (read later by e[:, :1])
    assert rewritten == 4
    with torch.no_grad():
        for actual, expected in zip(module(x), model(x)):
            torch.testing.assert_close(actual, expected)


def test_add_in_place_writes_only_when_the_sum_has_the_first_operands_shape_and_dtype():
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    expected = a + b
    assert add_in_place(a, b) is a and torch.equal(a, expected)
    small, big = torch.randn(1, 3), torch.randn(2, 3)
    result = add_in_place(small, big)  # broadcasting grows the result: out of place
    assert result.shape == (2, 3) and small.shape == (1, 3)
    low, high = torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3)
    assert add_in_place(low, high).dtype == torch.float32 and low.dtype == torch.bfloat16


def test_in_place_keeps_the_outputs_of_a_resnet():
    torchvision = pytest.importorskip("torchvision")
    extractor, module = _prepared(torchvision.models.resnet18(), input_size=(3, 64, 64), out_indices=(1, 2, 4))
    assert _run(restore_in_place, module) == 8  # the residual sum of each block (fx traced `out += identity` as a sum)
    _assert_same_outputs(module, extractor, torch.randn(2, 3, 80, 64))


# --- oneDNN fusion and MKL packing -----------------------------------------------------------------------------

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch build has no oneDNN")


class _ConvActivations(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6()
        self.c2, self.a2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish()
        self.c3 = nn.Conv2d(8, 8, 1)
        self.c4 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.fc, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        x = self.a2(self.c2(self.a1(self.c1(x))))
        y = self.c3(x)
        x = F.gelu(y) + y  # read twice: not fused
        x = F.leaky_relu(self.c4(x), 0.2)
        tokens = x.flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(self.fc(tokens), approximate="tanh"))


@onednn
@pytest.mark.parametrize("size", [(64, 64), (8, 12)])  # oneDNN's packed kernels for the larger convolutions
def test_use_onednn_converts_layers_fuses_single_reader_activations_and_keeps_outputs(size):
    model, module = _traced(_ConvActivations(), input_size=(3, 32, 32))
    assert _run(use_onednn, module) == 6  # c1+ReLU6, c2+Hardswish, c3 (read twice), c4+LeakyReLU, fc+GELU(tanh), fc2
    layers = {node.target: module.get_submodule(node.target) for node in module.graph.nodes if node.op == "call_module"}
    assert set(layers) == {"c1", "c2", "c3", "c4", "fc", "fc2"}
    assert [layers[name].activation for name in ("c1", "c2", "c3", "c4", "fc", "fc2")] == [
        "hardtanh", "hardswish", "none", "leaky_relu", "gelu", "none"]
    assert layers["fc"].algorithm == "tanh" and isinstance(layers["fc"], OneDNNLinear)
    assert layers["c4"].scalars == [0.2] and layers["c1"].scalars == [0.0, 6.0]
    for layout in (torch.contiguous_format, torch.channels_last):
        _assert_same_outputs(module, model, torch.randn(2, 3, *size).contiguous(memory_format=layout))


@onednn
def test_onednn_conv_packs_per_shape_and_computes_the_plain_ops_off_the_fast_path():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, padding=1)
    layer = OneDNNConv2d(conv, ("swish", [], ""))
    x = torch.randn(2, 16, 40, 40).contiguous(memory_format=torch.channels_last)
    expected = F.silu(conv(x))
    with torch.no_grad():
        fused = layer(x)
        nchw = layer(x.contiguous())
        layer(torch.randn(1, 16, 50, 60).contiguous(memory_format=torch.channels_last))  # 13.8 M multiply-adds
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    assert fused.is_contiguous(memory_format=torch.channels_last) and nchw.is_contiguous()  # layouts kept
    assert len(layer._packed) == 2  # one packing per input shape (the NCHW call runs F.conv2d)
    assert torch.equal(layer(x), expected)  # autograd on: the plain ops
    assert layer.double()(x.double()).dtype == torch.float64 and layer._packed == {}
    layer.float()
    assert set(layer.state_dict()) == {"weight", "bias"}
    small = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    depthwise, dense = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)
    with torch.no_grad():
        for plain in (depthwise, dense):
            onednn = OneDNNConv2d(plain)
            torch.testing.assert_close(onednn(small), plain(small), rtol=1e-5, atol=1e-6)
            # grouped convolutions always run on oneDNN, small dense ones on PyTorch's kernels
            assert len(onednn._packed) == (1 if plain is depthwise else 0)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._packed == {}
        with torch.no_grad():
            torch.testing.assert_close(twin(x), expected, rtol=1e-5, atol=1e-5)


@onednn
def test_onednn_linear_packs_per_row_count_and_keeps_no_cache_in_state():
    torch.manual_seed(0)
    linear = nn.Linear(96, 384)
    layer = OneDNNLinear(linear, ("hardtanh", [0.0, 6.0], ""))
    with torch.no_grad():
        for shape in [(1, 96), (2, 56, 96), (2, 7, 7, 96), (3000, 96), (2, 56, 96)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(layer(x), F.relu6(linear(x)), rtol=1e-5, atol=1e-5)
    assert len(layer._packed) == 3  # one per shape large enough for oneDNN (not the single row)
    assert set(layer.state_dict()) == {"weight", "bias"}
    x = torch.randn(4, 96)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert twin._packed == {}
        with torch.no_grad():
            torch.testing.assert_close(twin(x), F.relu6(linear(x)), rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # autograd on: the plain ops
    assert x.grad is not None


class _Residuals(nn.Module):
    """Convolutions followed by sums: which fuse, and which shortcuts the fused call may overwrite."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.g, self.c, self.e, self.f = (nn.Conv2d(16, 16, 3, padding=1) for _ in range(7))

    def forward(self, x):
        s = self.stem(x.repeat(1, 16 // x.shape[1], 1, 1))
        y = F.relu(self.a(s) + s)  # fused with its ReLU; the shortcut is the convolution's input: not overwritten
        z = self.b(y) + s  # fused; s is never read again: the sum goes into it
        u = self.g(z) + z  # fused; z is not read again but is the convolution's input: a new tensor
        w = torch.relu(y + self.c(u))  # fused with its ReLU; y is read again below: a new tensor
        v = self.e(w) + w.mean((2, 3), keepdim=True)  # a broadcasting sum: not fused
        p = self.f(v)
        v.mul_(2)  # the convolution's input is written before the sum: not fused (the sum would read it later)
        return p + v, y


@onednn
def test_fuse_residual_sums_overwrites_only_shortcuts_nothing_reads_afterwards():
    model, module = _traced(_Residuals(), input_size=(1, 64, 64))
    assert _run(fuse_residual_sums, module) == 4
    fused = {node.target: node for node in module.graph.nodes
             if node.op == "call_module" and isinstance(module.get_submodule(node.target), OneDNNConv2dAdd)}
    layers = {name: module.get_submodule(name) for name in fused}
    assert {name: (layer.activation, layer.overwrite_other) for name, layer in layers.items()} == {
        "a": ("relu", False), "b": ("none", True), "g": ("none", False), "c": ("relu", False)}
    assert [arg.name for arg in fused["b"].args] == ["add", "stem"]  # (input: the fused call of `a`, shortcut)
    assert not any(node.target in (F.relu, torch.relu) for node in module.graph.nodes)
    assert type(module.e) is nn.Conv2d and type(module.f) is nn.Conv2d
    for layout in (torch.channels_last, torch.contiguous_format):  # oneDNN, then the plain ops
        x = torch.randn(2, 1, 64, 64)
        with torch.no_grad():
            expected, actual = model(x), module(x.contiguous(memory_format=layout))
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


class _CheckedSum(nn.Module):
    """A library norm's ``x.ndim`` check reads the convolution's output before the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.shortcut = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        torch._assert(y.dim() == 4, "expected a 4D map")
        return F.relu(y + self.shortcut(x))


@onednn
def test_fuse_residual_sums_moves_shape_checks_after_the_fused_call():
    model, module = _traced(_CheckedSum(), input_size=(8, 48, 48))
    assert _run(fuse_residual_sums, module) == 1
    order = [node.name for node in module.graph.nodes]
    assert order.index("add") < order.index("dim") < order.index("_assert")  # the sum node is now the fused call
    assert module.conv.overwrite_other and module.conv.activation == "relu"
    x = torch.randn(2, 8, 48, 48).contiguous(memory_format=torch.channels_last)
    _assert_same_outputs(module, model, x)


@onednn
def test_onednn_conv_add_writes_into_the_shortcut_only_when_allowed():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    x = torch.randn(2, 16, 63, 63).contiguous(memory_format=torch.channels_last)
    shortcut = torch.randn(2, 32, 32, 32).contiguous(memory_format=torch.channels_last)
    expected = F.relu(conv(x) + shortcut).detach()
    with torch.no_grad():
        for overwrite in (False, True):
            other = shortcut.clone()
            result = OneDNNConv2dAdd(conv, ("relu", [], ""), overwrite_other=overwrite)(x, other)
            torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
            assert (result.data_ptr() == other.data_ptr()) is overwrite
            assert torch.equal(other, result if overwrite else shortcut)
        layer = OneDNNConv2dAdd(conv, overwrite_other=True)
        for other in (shortcut.contiguous(), shortcut[:1, :, :1, :1].clone()):  # another layout, broadcasting
            kept = other.clone()
            torch.testing.assert_close(layer(x, other), conv(x) + other, rtol=1e-5, atol=1e-5)
            assert torch.equal(other, kept)  # the plain ops write into the convolution's output, if anywhere
    with pytest.raises(ValueError, match="only ReLU"):
        OneDNNConv2dAdd(conv, ("gelu", [], "none"))
