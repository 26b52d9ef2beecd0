"""Trace a model with ``torch.fx``, remembering every module call, and make untraceable submodules opaque.

The tracer records, for each module call, the nodes it was given and the nodes it returned: the analyses need
them to tell a block's output from a node in the middle of a block. ``torch.fx`` already records the stack of
module calls that created each node in ``node.meta["nn_module_stack"]``; its keys (``"layer1.0.relu@1"`` for
the second call of a module) are the call keys used everywhere in fxfeat.

When tracing fails inside a submodule (data-dependent control flow, an ``int(tensor)``...), that submodule is
made a leaf (called as one opaque ``call_module`` node) and tracing starts again, so the rest of the model
stays visible. Only a failure in the model's own ``forward`` is fatal.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> traced = trace_model(torchvision.models.resnet18().eval())
    >>> traced.calls["layer1"].outputs
    ('layer1_1_relu_1',)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from fxfeat.errors import FxFeatWarning, InvalidModelError, TraceFailedError
from fxfeat.trace.checks import readable_checks
from fxfeat.trace.lock import ThreadConfinedTracer, trace_lock
from fxfeat.trace.registries import library_notrace_hints
from fxfeat.trace.state import model_state_kept, undoing_module_writes
from fxfeat.trace.values import DEFAULT_INPUT_SIZE, ValueTracer, check_input_shape, example_batch

__all__ = [
    "NORM_LAYERS", "ModuleCall", "TracedModel", "describe_node", "graph_targets", "trace_model",
    "trace_training_graph",
]

_CONTAINER_FORWARDS = {nn.Sequential.forward, nn.ModuleList.forward, nn.ModuleDict.forward}


@dataclass(frozen=True)
class ModuleCall:
    """One call of a submodule during tracing.

    Attributes:
        key: unique name of the call: the module path, with ``@n`` appended for its (n+1)-th call.
        path: qualified name of the module (``"layer1.0.conv1"``).
        module_type: the module's class.
        is_container: the module only chains its children (``nn.Sequential`` and subclasses that keep its
            ``forward``), so it is not a block of its own.
        is_leaf: the call is a single opaque ``call_module`` node.
        inputs: names of the nodes passed to the call.
        outputs: names of the nodes the call returned.
    """

    key: str
    path: str
    module_type: type
    is_container: bool
    is_leaf: bool
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class TracedModel:
    """The traced graph and what the tracer learned about module calls.

    Attributes:
        root: the model that was traced (the user's object; never modified).
        graph_module: a ``GraphModule`` over the traced graph; it shares submodules with ``root``.
        calls: every module call by key.
        node_calls: for each node name, the keys of the calls that created it, outermost first.
        opaque_modules: submodules made leaves because tracing through them failed, with the reason.
        opaque_types: the classes made opaque (every instance of a class that failed is a leaf).
        example: the example batch of shape-aware tracing (``None``: plain ``torch.fx`` traced the model).
    """

    root: nn.Module
    graph_module: fx.GraphModule
    calls: dict[str, ModuleCall]
    node_calls: dict[str, tuple[str, ...]]
    opaque_modules: dict[str, str] = field(default_factory=dict)
    opaque_types: frozenset[type] = frozenset()
    example: torch.Tensor | None = None

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def model_name(self) -> str:
        return type(self.root).__name__

    @functools.cached_property
    def nodes(self) -> dict[str, fx.Node]:
        """The graph's nodes by name."""
        return {node.name: node for node in self.graph.nodes}

    @functools.cached_property
    def image_nodes(self) -> frozenset[str]:
        """The nodes that stand for the input image: its placeholder and the shape check of a graph traced
        through shape-dependent Python."""
        image = next(node for node in self.graph.nodes if node.op == "placeholder")
        checks = [user.name for user in image.users if user.op == "call_function" and user.target is check_input_shape]
        return frozenset([image.name, *checks])

    @functools.cached_property
    def returned_by(self) -> dict[str, tuple[str, ...]]:
        """For each node name, the keys of the module calls that returned it."""
        index: dict[str, list[str]] = {}
        for call in self.calls.values():
            for name in call.outputs:
                index.setdefault(name, []).append(call.key)
        return {name: tuple(keys) for name, keys in index.items()}

    def calls_of_module(self, path: str) -> list[ModuleCall]:
        """Every call of the module at ``path``, in call order."""
        return [call for call in self.calls.values() if call.path == path]


def _proxy_node_names(value: object) -> tuple[str, ...]:
    names: list[str] = []

    def visit(item: object) -> None:
        if isinstance(item, fx.Proxy):
            names.append(item.node.name)
        elif isinstance(item, (list, tuple)):
            for element in item:
                visit(element)
        elif isinstance(item, dict):
            for element in item.values():
                visit(element)

    visit(value)
    return tuple(names)


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
# Batch and instance norms of any library: one op whose running statistics and training flag live in the module,
# kept whole so that the module's own flag decides how it normalises (``fxfeat.freeze`` keeps them in eval mode).
NORM_LAYERS = (nn.modules.batchnorm._NormBase,)


def _holds_layers(module: nn.Module) -> bool:
    """Whether a module is a composite block (it holds convolutions or linear layers of its own), as opposed
    to one layer with extras (a "same"-padding conv, a norm fused with its activation)."""
    return any(isinstance(child, _LAYERS) for child in module.modules() if child is not module)


class _RecordingTracer(ThreadConfinedTracer):
    """An ``fx.Tracer`` that records module calls and treats chosen submodules as leaves."""

    def __init__(self, opaque_types: set[type], leaf_types: tuple[type, ...], autowrap_functions: tuple):
        super().__init__(autowrap_functions=autowrap_functions)
        self.opaque_types = opaque_types
        self.leaf_types = leaf_types
        self.calls: dict[str, ModuleCall] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) in self.opaque_types:
            return True
        if isinstance(m, (*self.leaf_types, *NORM_LAYERS)) and not _holds_layers(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        count = self.num_calls.get(path, 0)
        key = f"{path}@{count}" if count else path
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception as error:  # remember the innermost module that failed, then let it propagate
            if not hasattr(error, "_fxfeat_module"):
                with contextlib.suppress(AttributeError, TypeError):
                    error._fxfeat_module = path
            raise
        self.calls[key] = ModuleCall(
            key=key,
            path=path,
            module_type=type(m),
            is_container=type(m).forward in _CONTAINER_FORWARDS,
            is_leaf=self.is_leaf_module(m, path),
            inputs=_proxy_node_names((args, kwargs)),
            outputs=_proxy_node_names(result),
        )
        return result


def describe_node(node: fx.Node) -> str:
    """A node for error messages: ``node 'add' (call_function add)``."""
    return f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)})"


@trace_lock()
def trace_model(
    model: nn.Module, max_opaque: int = 64, example_size: tuple[int, int, int] | None = None
) -> TracedModel:
    """Trace ``model`` (which should already be in eval mode) into a :class:`TracedModel`.

    Plain ``torch.fx`` tracing is tried first. If it fails, the model is traced again with proxies that carry
    their values on an example batch of ``example_size`` (C, H, W; default 3x224x224), so that Python depending
    only on shapes is evaluated (:mod:`fxfeat.trace.values`); if that Python depends on the input's batch or
    spatial size, the graph is only valid for the example's and starts with a check that says so. A submodule
    that still cannot be traced (data-dependent control flow) is made opaque, innermost first, together with every
    other instance of its class (they fail the same way, and each failure costs a new trace); each one is reported
    with an :class:`~fxfeat.errors.FxFeatWarning`. Threads trace one at a time (:mod:`fxfeat.trace.lock`).

    Raises:
        TraceFailedError: the model's own ``forward`` cannot be traced.
    """
    leaf_types, autowrap_functions = library_notrace_hints()
    root = _traceable_root(model)
    example = None
    try:
        tracer = _RecordingTracer(set(), leaf_types, autowrap_functions)
        graph, targets = _trace(tracer, root)
        opaque_types: dict[type, str] = {}
    except Exception:
        example = example_batch(model, example_size or DEFAULT_INPUT_SIZE)
        tracer, graph, targets, opaque_types = _trace_with_values(
            root, max_opaque, leaf_types, autowrap_functions, example)
        _guard_shape_decisions(root, graph, tracer, example, leaf_types, autowrap_functions, set(opaque_types))
    opaque = {call.path: opaque_types[call.module_type] for call in tracer.calls.values()
              if call.is_leaf and call.module_type in opaque_types}
    for kind, reason in opaque_types.items():
        paths = [path for path, _ in opaque.items() if type(model.get_submodule(path)) is kind]
        warnings.warn(
            f"torch.fx cannot trace through {type(model).__name__}.{paths[0] if paths else '?'} "
            f"({kind.__name__}{f' and {len(paths) - 1} more' if len(paths) > 1 else ''}); "
            f"{'they are kept as opaque calls' if len(paths) > 1 else 'it is kept as one opaque call'}, so no "
            f"level can be found inside. Reason: {reason}",
            FxFeatWarning,
            stacklevel=3,
        )
    _check_single_input(model, graph)
    graph_module = fx.GraphModule(targets, graph, type(model).__name__)
    node_calls = {
        node.name: tuple(node.meta.get("nn_module_stack", {}).keys()) for node in graph_module.graph.nodes
    }
    return TracedModel(model, graph_module, tracer.calls, node_calls, opaque, frozenset(opaque_types), example)


@trace_lock()
def trace_training_graph(traced: TracedModel) -> tuple[fx.Graph, dict[str, object]]:
    """Trace ``traced.root`` again as its ``.train()`` runs, the way ``traced`` was traced (plain or shape-aware,
    the same opaque modules): dropout, drop path and stochastic depth written as ``if self.training:`` or
    ``F.dropout(x, p, self.training)`` appear as they run in training. Nothing of the model changes: its flags,
    buffers (batch-norm statistics updated by shape-aware tracing) and the random number generator's state are
    restored. Returns the graph and what its ``call_module`` and ``get_attr`` targets name.
    """
    model = traced.root
    leaf_types, autowrap_functions = library_notrace_hints()
    root = _traceable_root(model)
    with model_state_kept(model), torch.no_grad():
        model.train()
        if traced.example is None:
            tracer = _RecordingTracer(set(traced.opaque_types), leaf_types, autowrap_functions)
        else:
            tracer = _ValueRecordingTracer(set(traced.opaque_types), leaf_types, autowrap_functions,
                                           example=traced.example)
        return _trace(tracer, root)


def _trace(tracer: fx.Tracer, root: nn.Module) -> tuple[fx.Graph, dict[str, object]]:
    """Trace ``root``, then undo what tracing wrote into its modules (torch.fx itself stores the tensors the code
    creates as ``_tensor_constant`` attributes of the root). Returns the graph and what its ``call_module`` and
    ``get_attr`` targets name, constants included."""
    with undoing_module_writes(root):
        graph = tracer.trace(root, concrete_args=_default_arguments(root))
        readable_checks(graph)
        targets = graph_targets(graph, root)
    return graph, targets


def graph_targets(graph: fx.Graph, root: nn.Module) -> dict[str, object]:
    """What the ``call_module`` and ``get_attr`` targets of ``graph`` name in ``root``."""
    return {node.target: operator.attrgetter(node.target)(root)
            for node in graph.nodes if node.op in ("call_module", "get_attr")}


def _traceable_root(model: nn.Module) -> nn.Module:
    """What to trace for ``model``: itself, or, when its ``forward`` is wrapped by a decorator (the wrapper takes
    ``*args, **kwargs``, which torch.fx cannot map onto the wrapped signature), a shallow copy whose ``forward``
    passes the image alone to the wrapped one, as a caller does. The copy shares every submodule and tensor."""
    forward = type(model).forward
    if not hasattr(forward, "__wrapped__"):
        return model

    def entry(self, image):
        return forward(self, image)

    root = copy.copy(model)
    namespace = {"forward": entry, "__module__": type(model).__module__}
    root.__class__ = type(type(model).__name__, (type(model),), namespace)
    return root


class _ValueRecordingTracer(ValueTracer, _RecordingTracer):
    """Records module calls, with proxies that carry their values."""


def _trace_with_values(model, max_opaque, leaf_types, autowrap_functions, example):
    """Shape-aware tracing, making submodules opaque while a failure lies inside one."""
    opaque_types: dict[type, str] = {}  # class -> why its first instance failed
    failed_paths: list[str] = []
    first_failure: tuple[str, BaseException] | None = None
    while True:
        tracer = _ValueRecordingTracer(set(opaque_types), leaf_types, autowrap_functions, example=example)
        try:
            graph, targets = _trace(tracer, model)
            return tracer, graph, targets, opaque_types
        except Exception as error:
            path = getattr(error, "_fxfeat_module", "")
            if first_failure is None:
                first_failure = (path, error)
            kind = type(model.get_submodule(path)) if path else None
            if kind is None or kind in opaque_types or len(opaque_types) >= max_opaque:
                raise _trace_failure(model, path, error, first_failure, failed_paths) from error
            opaque_types[kind] = f"{type(error).__name__}: {error}".splitlines()[0]
            failed_paths.append(path)


def _guard_shape_decisions(model, graph, tracer, example, leaf_types, autowrap_functions, opaque_types) -> None:
    """Trace again with another batch size and another input size; where the Python decisions differ, the graph
    holds the example's shape, so it starts with a check of the input's shape (``check_input_shape``)."""
    if not tracer.decisions:
        return
    channels, height, width = example.shape[1:]
    guarded = {}
    variants = {"batch": (example.shape[0] + 1, height, width), "size": (example.shape[0], height + 32, width + 64)}
    for what, (batch, other_height, other_width) in variants.items():
        other = example_batch(model, (channels, other_height, other_width), batch=batch)
        retrace = _ValueRecordingTracer(opaque_types, leaf_types, autowrap_functions, example=other)
        try:
            _trace(retrace, model)
            same = [(d.kind, d.value) for d in retrace.decisions] == [(d.kind, d.value) for d in tracer.decisions]
        except Exception:
            same = False
        if not same:
            guarded[what] = example.shape[0] if what == "batch" else (height, width)
    if not guarded:
        return
    image = next(node for node in graph.nodes if node.op == "placeholder")
    with graph.inserting_after(image):
        check = graph.call_function(check_input_shape, (image, guarded.get("batch"), guarded.get("size")))
    image.replace_all_uses_with(check, delete_user_cb=lambda user: user is not check)


def _default_arguments(model: nn.Module) -> dict[str, object] | None:
    """The defaults of ``forward``'s optional arguments after the image (``mask=None``,
    ``return_dict=False``...), traced as the constants a caller passing only the image gets, so that
    ``if mask is not None:`` takes the branch the model takes on an image alone."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    defaults = {
        parameter.name: parameter.default
        for parameter in parameters[1:]
        if parameter.default is not inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return defaults or None


def _check_single_input(model: nn.Module, graph: fx.Graph) -> None:
    """The model must run on one image batch: every input after the first needs a default value."""
    inputs = [node for node in graph.nodes if node.op == "placeholder"]
    required = [node.target for node in inputs[1:] if not node.args and not str(node.target).startswith("*")]
    if required or not inputs:
        names = ", ".join(node.target for node in inputs)
        needs = f"needs {1 + len(required)} inputs ({', '.join(required)} without a default)" if inputs else \
            "takes no input"
        raise InvalidModelError(
            f"{type(model).__name__}.forward({names}) {needs}; fxfeat compiles models that take one image batch.",
            hint="wrap the model in a module whose forward(x) passes the other inputs, e.g. "
            "forward(self, x): return self.model(x, fixed_extra_input).",
        )


def _trace_failure(
    model: nn.Module,
    path: str,
    error: BaseException,
    first_failure: tuple[str, BaseException],
    opaque: list[str],
) -> TraceFailedError:
    model_name = type(model).__name__
    where = f"submodule '{path}' ({type(model.get_submodule(path)).__name__})" if path else "its own forward()"
    first_path, first_error = first_failure
    text = f"torch.fx cannot trace {model_name}: the failure is in {where}: {type(error).__name__}: {error}"
    if first_error is not error:
        first_where = f"submodule '{first_path}'" if first_path else "forward()"
        text += (
            f"\nIt started in {first_where} ({type(first_error).__name__}: {first_error}); making "
            f"{', '.join(repr(p) for p in opaque) or 'it'} opaque did not help."
        )
    return TraceFailedError(
        text,
        hint="torch.fx needs forward() code without data-dependent Python control flow; move such code into "
        "a submodule (fxfeat then keeps it opaque) or wrap the function with torch.fx.wrap.",
    )
