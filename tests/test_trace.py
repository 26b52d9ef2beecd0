"""Shape-aware tracing: forwards with Python on shapes, in the root forward and in submodules, trace without
opaque modules; graphs that hold a shape-dependent decision check the input's shape."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.proxy import TraceError

import fxfeat
from tests.helpers import assert_bit_equal_to_eager


class _ChannelGroups(nn.Module):
    """A loop over channel groups counted from the input's shape, and tuple unpacking of the shape."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        self.convs = nn.ModuleList(nn.Conv2d(channels // groups, channels // groups, 3, padding=1)
                                   for _ in range(groups))

    def forward(self, x):
        batch, channels, height, width = x.shape
        step = channels // self.groups
        parts = [self.convs[i](x[:, i * step:(i + 1) * step]) for i in range(x.shape[1] // step)]
        return torch.cat(parts, 1).reshape(batch, channels, height, width)


class _Stage(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.down = nn.Conv2d(cin, cout, 3, stride=2, padding=1)
        self.mix = _ChannelGroups(cout, 2)

    def forward(self, x):
        if len(x.shape) != 4:  # len() of a shape
            raise ValueError("maps only")
        return F.relu(self.mix(self.down(x)))


class ShapeChecks(nn.Module):
    """Shape-dependent Python that does not depend on the input size: the graph stays general."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(_Stage(3, 8), _Stage(8, 16), _Stage(16, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        if x.shape[1] != 3:  # a check in the root forward
            raise ValueError("RGB only")
        for size in x.shape[2:]:  # iteration over a shape
            if size < 8:
                raise ValueError("too small")
        return self.head(self.stages(x).mean((2, 3)))


def test_shape_checks_trace_without_opaque_modules_and_stay_general():
    model = ShapeChecks().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxfeat.FxFeatWarning)
        extractor = fxfeat.compile(model, input_size=(3, 64, 64))
        report = fxfeat.inspect(model, input_size=(3, 64, 64))
    assert not report.opaque_modules
    assert extractor.feature_info.reduction() == [2, 4, 8]
    assert extractor.feature_info.module_name() == ["stages.0", "stages.1", "stages.2"]
    checks = [n for n in extractor.graph.nodes if n.op == "call_function" and n.target.__name__ == "check_input_shape"]
    assert not checks  # no decision depends on the input's size: the graph is general
    for batch, height, width in ((2, 64, 64), (1, 72, 120)):
        assert_bit_equal_to_eager(model, extractor, torch.randn(batch, 3, height, width))


def _check_channels(x):
    if x.shape[1] < 1:  # a comparison on a size
        raise ValueError("no channels")
    return x


def _int_of_size(x):
    return x[:, : int(x.shape[1])]


def _len_of_shape(x):
    if len(x.shape) != 4:
        raise ValueError("maps only")
    return x


def _iterate_shape(x):
    for size in x.shape[2:]:
        if size < 1:
            raise ValueError("empty map")
    return x


def _sqrt_of_size(x):
    return x * (1 / int(math.sqrt(x.shape[1])))


def _range_over_size(x):
    return torch.cat([x[:, i : i + 1] for i in range(x.shape[1])], 1)


def _unpack_shape(x):
    batch, *rest = x.shape  # a starred unpacking, which plain torch.fx cannot do
    return x.reshape(batch, -1).reshape(batch, *rest)


def _write_into(x):
    x = x.clone()
    x[:, 0] = x[:, -1]  # setitem on a traced tensor
    return x


_CONSTRUCTS = [_check_channels, _int_of_size, _len_of_shape, _iterate_shape, _sqrt_of_size, _range_over_size,
               _unpack_shape, _write_into]


class _ConstructStage(nn.Module):
    def __init__(self, construct, cin: int, cout: int):
        super().__init__()
        self.construct = construct
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x):
        return F.relu(self.conv(self.construct(x)))


class _ConstructModel(nn.Module):
    """``construct`` in the root forward and in every stage."""

    def __init__(self, construct):
        super().__init__()
        self.construct = construct
        widths = ((3, 8), (8, 16), (16, 32))
        self.stages = nn.Sequential(*(_ConstructStage(construct, cin, cout) for cin, cout in widths))

    def forward(self, x):
        return self.stages(self.construct(x)).mean((2, 3))


@pytest.mark.parametrize("construct", _CONSTRUCTS, ids=[c.__name__.strip("_") for c in _CONSTRUCTS])
def test_each_shape_construct_traces_in_the_root_and_in_submodules(construct):
    torch.manual_seed(0)
    model = _ConstructModel(construct).eval()
    # Plain torch.fx cannot trace it: the shape-aware tracer is what makes it work.
    with pytest.raises((TraceError, TypeError, RuntimeError)):
        torch.fx.symbolic_trace(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxfeat.FxFeatWarning)
        extractor = fxfeat.compile(model, input_size=(3, 32, 32))
        report = fxfeat.inspect(model, input_size=(3, 32, 32))
    assert not report.opaque_modules
    assert extractor.feature_info.module_name() == ["stages.0", "stages.1", "stages.2"]
    assert not [n for n in extractor.graph.nodes if getattr(n.target, "__name__", "") == "check_input_shape"]
    for batch, height, width in ((2, 32, 32), (3, 40, 56)):
        assert_bit_equal_to_eager(model, extractor, torch.randn(batch, 3, height, width))


class _Tokens(nn.Module):
    """Tokens back to a square map with ``int(math.sqrt(n))``: the side is baked from the example."""

    def forward(self, tokens):
        side = int(math.sqrt(tokens.shape[1]))
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


class SquareTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.to_map = _Tokens()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.to_map(self.down(self.stem(x)).flatten(2).transpose(1, 2))
        return self.head(x.mean((2, 3)))


class SquareOrWide(nn.Module):
    """A branch on ``h == w``: the graph holds the example's branch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.square = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(8, 16, 5, stride=2, padding=2)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = self.stem(x)
        return (self.square(x) if h == w else self.wide(x)).mean((2, 3))


@pytest.mark.parametrize("model_class, size, other", [(SquareTokens, (64, 64), (96, 96)),
                                                      (SquareOrWide, (64, 64), (64, 128))])
def test_size_dependent_python_guards_the_input_shape(model_class, size, other):
    model = model_class().eval()
    extractor = fxfeat.compile(model, input_size=(3, *size))
    assert extractor.feature_info.reduction() == [4, 8]
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, *size))
    assert_bit_equal_to_eager(model, extractor, torch.randn(5, 3, *size))  # the batch size is free
    with torch.no_grad(), pytest.raises(fxfeat.InputShapeError, match=f"{size[0]}x{size[1]}"):
        extractor(torch.randn(2, 3, *other))
    # Compiled at the other size, it follows the model there.
    assert_bit_equal_to_eager(model, fxfeat.compile(model, input_size=(3, *other)), torch.randn(2, 3, *other))


class _DataDependent(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # on tensor values: no example can decide it for every input


class WithDataDependentBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.gate = _DataDependent()
        self.down2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("RGB only")
        return self.down2(self.gate(self.down(x)))


def test_data_dependent_python_still_makes_its_submodule_opaque():
    model = WithDataDependentBlock().eval()
    with pytest.warns(fxfeat.FxFeatWarning, match="gate"):
        report = fxfeat.inspect(model, input_size=(3, 32, 32))
    assert set(report.opaque_modules) == {"gate"}
    with pytest.warns(fxfeat.FxFeatWarning, match="gate"):
        extractor = fxfeat.compile(model, input_size=(3, 32, 32))
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 40, 48))


class _RootDataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_data_dependent_root_forward_is_a_clear_error():
    with pytest.raises(fxfeat.TraceFailedError, match="data-dependent"):
        fxfeat.compile(_RootDataDependent().eval(), input_size=(3, 32, 32))


def test_the_model_is_not_changed_by_shape_aware_tracing():
    model = SquareTokens().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fxfeat.compile(model, input_size=(3, 64, 64))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert type(model) is SquareTokens and not model.training
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_tracing_leaves_nothing_in_the_model():
    # TinyViT's attention caches its bias per device on first use, so tracing it would store a proxy there;
    # torch.fx also stores the tensors traced code creates on the root as `_tensor_constant` attributes.
    from tests.conftest import timm_model

    # ConViT's attention assigns its position buffer in forward, which stored a proxy in the buffer table.
    for name in ("tiny_vit_5m_224", "swin_tiny_patch4_window7_224", "convit_tiny"):
        model = timm_model(name)
        attributes = {path: set(module.__dict__) for path, module in model.named_modules()}
        buffers = {path: dict(module._buffers) for path, module in model.named_modules()}
        fxfeat.compile(model)
        fxfeat.compile(model, levels="auto")  # a second trace starts from the same state
        assert {path: set(module.__dict__) for path, module in model.named_modules()} == attributes
        assert all(module._buffers[key] is value
                   for path, module in model.named_modules() for key, value in buffers[path].items())
        caches = [module.attention_bias_cache for module in model.modules() if hasattr(module, "attention_bias_cache")]
        assert all(not cache for cache in caches)
        with torch.no_grad():
            assert model(torch.randn(1, 3, 224, 224)).shape == (1, model.num_classes)


class _ManyShapeReads(nn.Module):
    """Hundreds of ops and decisions on sizes: shape-aware tracing evaluates them all."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        for _ in range(150):
            if x.shape[-1] > 1:  # a Python decision on a size: plain torch.fx tracing fails here
                x = x + 1
        return x


def test_shape_aware_tracing_time_does_not_grow_with_the_classes_python_has_loaded():
    # Evaluating each traced op used to put torch.nn.Module's own __call__ back for the duration, and assigning a
    # class attribute costs time for every subclass alive (each fx.GraphModule is a class): compiling got slower
    # the more models a process had built (a third of make test's time). Measured here with 20,000 extra
    # subclasses: that code 20x slower, now 1.3x to 2.1x (torch.fx itself patches nn.Module a few times per trace,
    # and the garbage collector has more to walk), hence the bound.
    import time

    def compile_seconds() -> float:
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            fxfeat.compile(_ManyShapeReads(), levels="auto", input_size=(3, 32, 32))
            best = min(best, time.perf_counter() - start)
        return best

    alone = compile_seconds()
    subclasses = [type(f"_Unrelated{index}", (nn.Module,), {}) for index in range(20000)]
    crowded = compile_seconds()
    assert len(subclasses) == 20000 and crowded < 5 * alone, (alone, crowded)


class _Gray(nn.Module):
    """A model built for one input channel; ``square_only`` adds Python on the input's size (shape-aware tracing)."""

    def __init__(self, square_only: bool = False):
        super().__init__()
        self.square_only = square_only
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        if self.square_only and x.shape[-1] != x.shape[-2]:
            x = x[..., : x.shape[-2], : x.shape[-2]]
        return self.down(self.stem(x).relu()).mean((2, 3))


class _CoordinateChannels(nn.Module):
    """An RGB model whose first convolution reads the image and two coordinate channels (5 in all)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(5, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        rows = torch.linspace(-1, 1, x.shape[-2]).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[-1])
        columns = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1).expand(x.shape[0], 1, x.shape[-2], -1)
        return self.down(self.stem(torch.cat([x, rows, columns], 1)).relu()).mean((2, 3))


@pytest.mark.parametrize("square_only, traced_at", [(False, [(3, 64, 64)]), (True, [(3, 64, 64), (1, 64, 64)])])
def test_the_trace_stage_resolves_the_input_channels_once(monkeypatch, square_only, traced_at):
    # A model built for another number of channels than it declares (timm's in_chans=1 keeps a 3-channel
    # pretrained_cfg): the trace stage reads the first convolution's number where a probe fails there, and traces
    # again only a graph whose Python ran on an example of the declared size. Nothing later goes back to tracing.
    import fxfeat.trace.modes as modes_module

    sizes = []
    trace_model = modes_module.trace_model

    def recording(model, example_size):
        sizes.append(example_size)
        return trace_model(model, example_size=example_size)

    monkeypatch.setattr(modes_module, "trace_model", recording)
    model = _Gray(square_only).eval()
    modes = modes_module.trace_modes(model, (3, 64, 64), size_given=False)
    assert modes.input_size == (1, 64, 64) and sizes == traced_at
    assert square_only == (modes.traced.example is not None and modes.traced.example.shape[1] == 1)
    assert modes_module.trace_modes(model, (3, 64, 64), size_given=True).input_size == (3, 64, 64)
    sizes.clear()
    extractor = fxfeat.compile(model)  # the size the model declares (the default here): one trace in eval mode
    assert extractor.input_size == (1, 224, 224) and sizes == [(3, 224, 224), (1, 224, 224)][: len(traced_at)]
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 1, 224, 224))


def test_a_first_convolution_reading_more_than_the_image_keeps_the_declared_channels():
    model = _CoordinateChannels().eval()
    extractor = fxfeat.compile(model, input_size=None)
    assert extractor.input_size == (3, 224, 224) and extractor.feature_info.channels() == [8, 16]
    assert_bit_equal_to_eager(model, extractor, torch.randn(2, 3, 96, 128))
