"""Shape-aware tracing: proxies that know the value they stand for on an example input.

Plain ``torch.fx`` tracing fails on Python that looks at sizes: ``if x.shape[1] != 3``, ``int(math.sqrt(n))``,
``for i in range(x.shape[1] // k)``, ``h, w = x.shape[-2:]`` passed on to Python code, ``len(x.shape)``. The
:class:`ValueTracer` runs every traced op on an example batch as it records it, so each proxy carries its value,
and Python that needs a concrete bool, int, float, length or iteration gets it from that value. Each such
*decision* is recorded. Arithmetic on sizes that stays in tensor ops (``x.view(b, -1, c)`` with ``b, c`` read
from ``x.shape``) is still recorded as graph nodes and follows the input at run time.

A decision on a value computed from tensor *data* (``if x.sum() > 0``, ``int(t.item())``) is data-dependent: it
raises ``TraceError`` as plain tracing does, so the submodule holding it is made opaque.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Picky(nn.Module):
    ...     def forward(self, x):
    ...         if x.shape[1] != 3:
    ...             raise ValueError("RGB only")
    ...         return x.flatten(2).mean(-1)
    >>> tracer = ValueTracer(example=torch.randn(2, 3, 8, 8))
    >>> graph = tracer.trace(Picky())
    >>> [(decision.kind, decision.value) for decision in tracer.decisions]
    [('bool', False)]
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.proxy import Attribute, TraceError

from fxfeat.errors import InputShapeError
from fxfeat.trace.lock import ThreadConfinedTracer, trace_lock
from fxfeat.trace.metadata import data_inputs

__all__ = ["DEFAULT_INPUT_SIZE", "EXAMPLE_BATCH", "Decision", "ValueTracer", "check_input_shape", "example_batch"]

_UNKNOWN = object()  # the value of a node that could not be computed
_VALUE = "_fxfeat_value"  # where a proxy keeps its value
# Tensor factories that take sizes: called with sizes read from proxies, they become graph nodes.
_FACTORIES = ("empty", "zeros", "ones", "full", "rand", "randn", "arange", "linspace", "eye")
DEFAULT_INPUT_SIZE = (3, 224, 224)  # (C, H, W) of the probes where neither the user nor the model gives one
EXAMPLE_BATCH = 2  # as the shape probes: a batch of one would hide which dimension is the batch


@dataclass(frozen=True)
class Decision:
    """One place where traced Python needed a concrete value.

    Attributes:
        node: the node whose value was used.
        kind: what Python asked for: ``"bool"``, ``"int"``, ``"index"``, ``"float"``, ``"len"`` or ``"iter"``.
        value: the answer at the example input (for ``len``, ``iter`` and ``keys``: the number of elements).
    """

    node: str
    kind: str
    value: Any


class _Concrete:
    """The conversions Python applies to a value, answered from the traced value."""

    def __len__(self) -> int:
        return len(self.tracer.decide(self, "len"))

    def __int__(self) -> int:
        return int(self.tracer.decide(self, "int"))

    def __index__(self) -> int:
        return operator.index(self.tracer.decide(self, "index"))

    def __float__(self) -> float:
        return float(self.tracer.decide(self, "float"))

    def __getattr__(self, name: str) -> _ValueAttribute:
        return _ValueAttribute(self, name)


class _ValueProxy(_Concrete, fx.Proxy):
    def __setitem__(self, key, value) -> None:
        """``x[key] = value`` is recorded as an ``operator.setitem`` node (a write into ``x``, which the alias
        analysis follows), and done on the example value as eager code does it."""
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class _ValueAttribute(_Concrete, Attribute):
    pass


def check_input_shape(x: torch.Tensor, batch: int | None, size: tuple[int, int] | None) -> torch.Tensor:
    """Raise if ``x`` is not of the batch size and spatial size a shape-specialised graph was traced for.
    TorchScript compiles it (an exported extractor keeps the check), with a plain message."""
    wrong_batch = batch is not None and x.shape[0] != batch
    wrong_size = False
    if size is not None:
        wrong_size = x.shape[-2] != size[0] or x.shape[-1] != size[1]
    if wrong_batch or wrong_size:
        if not torch.jit.is_scripting():
            raise _input_shape_error(x, batch, size)
        raise RuntimeError("InputShapeError: this extractor was traced through Python code that depends on the "
                           "input's shape, and is valid only for the batch size and height x width it was compiled "
                           "for (see the extractor's feature_info shapes)")
    return x


@torch.jit.unused
def _input_shape_error(x: torch.Tensor, batch: int | None, size: tuple[int, int] | None) -> InputShapeError:
    expected = [f"batch size {batch}"] if batch is not None else []
    expected += [f"height x width {size[0]}x{size[1]}"] if size is not None else []
    return InputShapeError(
        f"this extractor was traced through Python code that depends on the input's shape, and is valid only "
        f"for inputs with {' and '.join(expected)}; got an input of shape {tuple(x.shape)}.",
        hint="compile again with input_size=(C, H, W) of your inputs (and a batch of that size), or remove "
        "the shape-dependent Python from the model's forward.",
    )


def example_batch(module: torch.nn.Module, size: tuple[int, ...], batch: int = EXAMPLE_BATCH,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """A random input batch of per-sample ``size`` in the dtype of ``module``'s parameters (float32 if they are not
    floating point) and on their device (or ``device``)."""
    reference = next(iter(module.parameters()), None)
    floating = reference is not None and reference.is_floating_point()
    device = device or (reference.device if reference is not None else "cpu")
    return torch.randn(batch, *size, dtype=reference.dtype if floating else torch.float32, device=device)


def _holds(test, value: Any) -> bool:
    """Whether some leaf of a nested structure of arguments passes ``test``."""
    found = []
    fx.node.map_aggregate(value, lambda item: found.append(item) if test(item) else None)
    return bool(found)


class ValueTracer(ThreadConfinedTracer):
    """An ``fx.Tracer`` whose proxies carry their values on ``example`` (see the module docstring).

    Attributes:
        decisions: every concrete value traced Python asked for, in order.
    """

    def __init__(self, *args, example: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.example = example
        self.data_derived: set[fx.Node] = set()
        self.decisions: list[Decision] = []
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def trace(self, root, concrete_args=None) -> fx.Graph:
        """Trace ``root``; tensor factories given sizes read from proxies (``torch.zeros(b, 1, h, w)``) are
        recorded as graph nodes, so the sizes follow the input instead of being taken from the example. The
        factories are torch's, shared by every thread: they are replaced under :func:`~fxfeat.trace.lock.trace_lock`
        (and the replacements call the factory itself for arguments without proxies, as other threads pass)."""
        with trace_lock():
            originals = {name: getattr(torch, name) for name in _FACTORIES}
            for name, function in originals.items():
                setattr(torch, name, self._recording(function))
            try:
                return super().trace(root, concrete_args)
            finally:
                for name, function in originals.items():
                    setattr(torch, name, function)

    def _recording(self, function):
        def factory(*args, **kwargs):
            if _holds(lambda item: isinstance(item, fx.Proxy), (args, kwargs)):
                return self.create_proxy("call_function", function, args, kwargs)
            return function(*args, **kwargs)

        factory.__wrapped__ = function
        return factory

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        # The value lives on the proxy, so it is freed with it: tracing holds no more than the eager forward does.
        proxy.__dict__[_VALUE] = self._evaluate(kind, target, args, kwargs)
        data = {argument.name for argument in data_inputs(node)}

        def carries_data(item: Any) -> bool:
            argument = item._node if isinstance(item, Attribute) else getattr(item, "node", None)
            if not isinstance(item, fx.Proxy) or argument is None or argument.name not in data:
                return False
            return argument in self.data_derived or isinstance(self._value_of(item), torch.Tensor)

        if _holds(carries_data, (args, kwargs)):
            self.data_derived.add(node)
        return proxy

    def _value_of(self, item: Any) -> Any:
        if isinstance(item, Attribute):  # x.shape: read from the owner's value
            owner = self._value_of(item.root)
            return _UNKNOWN if owner is _UNKNOWN else getattr(owner, item.attr, _UNKNOWN)
        if isinstance(item, fx.Proxy):
            return item.__dict__.get(_VALUE, _UNKNOWN)
        return item

    @contextlib.contextmanager
    def _real_module_calls(self) -> Iterator[None]:
        """Module calls and attribute reads as outside tracing, for the duration.

        While it traces, torch.fx's patched ``nn.Module.__call__`` and ``__getattr__`` hand every module call and
        parameter read to this tracer's ``call_module`` and ``getattr``, which record graph nodes. Computing a
        value must run the module for real, so these two are shadowed on the instance by pass-throughs. (Putting
        the original methods back on ``nn.Module`` instead cost about 0.3 ms a time with timm loaded: assigning a
        class attribute invalidates the method caches of every subclass, and each ``GraphModule`` is a class.)
        The shadows found on the instance (:class:`~fxfeat.trace.lock.ThreadConfinedTracer`'s) are put back.
        """
        shadowed = {name: vars(self)[name] for name in ("call_module", "getattr") if name in vars(self)}
        self.call_module = lambda module, forward, args, kwargs: forward(*args, **kwargs)
        self.getattr = lambda attr, attr_val, parameter_proxy_cache: attr_val
        try:
            yield
        finally:
            del self.call_module, self.getattr
            vars(self).update(shadowed)

    def _evaluate(self, kind: str, target, args, kwargs) -> Any:
        """The value of a new node, computed from its arguments' values (``_UNKNOWN`` if that fails)."""
        if kind == "placeholder":
            self._placeholders += 1
            if str(target).startswith("**"):
                return {}  # **kwargs: a caller passing only the image passes none
            if str(target).startswith("*"):
                return ()
            return self.example if self._placeholders == 1 else _UNKNOWN
        if kind == "output":
            return _UNKNOWN
        values = fx.node.map_aggregate((args, kwargs), self._value_of)
        if _holds(lambda item: item is _UNKNOWN, values):
            return _UNKNOWN
        (args, kwargs) = values
        try:
            with torch.no_grad(), self._real_module_calls():
                if kind == "get_attr":
                    value = operator.attrgetter(target)(self.root)
                    return value.detach().clone() if isinstance(value, torch.Tensor) else value
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*args, **kwargs)
        except Exception:
            return _UNKNOWN
        return _UNKNOWN

    def decide(self, proxy: fx.Proxy, kind: str) -> Any:
        """The concrete value Python asks ``proxy`` for, recorded as a decision.

        Raises:
            TraceError: the value depends on tensor data, or could not be computed.
        """
        node = proxy.node
        value = self._value_of(proxy)
        if value is _UNKNOWN:
            raise TraceError(f"{kind}() of {node.format_node()}: its value could not be computed")
        counting = kind in ("len", "iter", "keys")  # how many elements, not what they are (each is a proxy)
        if not counting and (node in self.data_derived or isinstance(value, torch.Tensor)):
            raise TraceError(f"{kind}() of {node.format_node()} depends on tensor values (data-dependent control "
                             "flow)")
        recorded = len(value) if counting else value
        self.decisions.append(Decision(node.name, kind, recorded))
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.decide(obj, "bool"))

    def iter(self, obj: fx.Proxy):
        value = self.decide(obj, "iter")
        return iter([obj[i] for i in range(len(value))])

    def keys(self, obj: fx.Proxy):
        return list(self.decide(obj, "keys").keys())
