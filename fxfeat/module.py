"""``FeatureGraphModule``: the ``torch.fx.GraphModule`` an extractor is, with its ``feature_info``.

The extractor is a view of the model, as torchvision's ``create_feature_extractor``: the submodules, parameters
and buffers it needs are the model's own objects. An optimizer over ``model.parameters()`` trains it,
``model.requires_grad_(False)`` freezes it, its batch-norm statistics are the model's, and ``.train()``,
``.eval()``, ``.to()`` or ``.half()`` on it apply to the model's modules it holds. Only what fxfeat rewrites is a
copy: the layers ``output_stride`` dilates (module objects of their own, sharing the model's parameters), a new
classifier (``num_classes``), norms ``fxfeat.freeze(norm="frozen")`` converts. Compile ``copy.deepcopy(model)``
for an extractor independent of the model.

Two graphs: the one traced in eval mode runs under ``.eval()`` and the one traced in train mode under
``.train()``, so dropout, drop path and stochastic depth written in Python run as in the eager model. (When both
graphs are the same, as in most CNNs, there is one.) The state dict's keys are the model's, and
``load_state_dict`` accepts the model's full state dict (the keys of the parts the extractor dropped are ignored).
Extractors pickle, ``torch.save``/``torch.load`` and ``copy.deepcopy`` whole.

Example:
    >>> import copy, torch, torchvision, fxfeat
    >>> model = torchvision.models.resnet18()
    >>> extractor = fxfeat.compile(model, out_indices=(1, 2))
    >>> extractor.get_submodule("layer1.0.conv1").weight is model.layer1[0].conv1.weight
    True
    >>> _ = extractor.load_state_dict(model.state_dict())     # fc and layer3/4 are ignored
    >>> twin = copy.deepcopy(extractor).eval()
    >>> x = torch.randn(1, 3, 64, 64)
    >>> all(torch.equal(a, b) for a, b in zip(twin(x), extractor.eval()(x)))
    True
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxfeat.errors import InputShapeError
from fxfeat.feature_info import FeatureInfo
from fxfeat.trace.tracer import graph_targets

__all__ = ["FeatureGraphModule"]

_PRESERVED = "_user_preserved_attributes"  # GraphModule's own key for attributes deepcopy must keep
_GRAPHS = "fxfeat_graphs"  # meta key: {"train": graph, "eval": graph} when the two modes differ
_DROPPED_KEYS = "fxfeat_dropped_keys"  # meta key: the model's state-dict keys the extractor does not hold
_NON_PERSISTENT = "fxfeat_non_persistent"  # meta key: buffers left out of the state dict, as in the model
_FROZEN_NORMS = "fxfeat_frozen_norms"  # meta key: norms kept in eval mode by ``fxfeat.freeze``


class FeatureGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose ``forward`` returns features, described by ``feature_info``.

    Attributes:
        feature_info: :class:`~fxfeat.FeatureInfo` of the returned tensors.
        input_size: ``(C, H, W)`` the extractor was compiled (probed) at; exports default to it.
    """

    # Python-side descriptions, not part of the computation: TorchScript leaves them out.
    __jit_unused_properties__ = [*getattr(fx.GraphModule, "__jit_unused_properties__", []), "feature_info",
                                 "input_size", "mode_graphs", "eval_mode_norms"]

    @property
    def feature_info(self) -> FeatureInfo:
        return self.meta[_PRESERVED]["feature_info"]

    @feature_info.setter
    def feature_info(self, value: FeatureInfo) -> None:
        self.meta.setdefault(_PRESERVED, {})["feature_info"] = value

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        return self.meta[_PRESERVED].get("input_size")

    @input_size.setter
    def input_size(self, value: tuple[int, int, int]) -> None:
        self.meta.setdefault(_PRESERVED, {})["input_size"] = tuple(value)

    @property
    def mode_graphs(self) -> dict[str, fx.Graph]:
        """The graph run in each mode: ``{"train": ..., "eval": ...}`` (the same graph when they do not differ)."""
        return dict(self.meta.get(_GRAPHS) or {"train": self.graph, "eval": self.graph})

    @classmethod
    def build(
        cls,
        model: nn.Module,
        graphs: dict[str, fx.Graph],
        targets: dict[str, object],
        feature_info: FeatureInfo,
        training: bool,
        class_name: str,
        input_size: tuple[int, int, int] | None = None,
    ) -> FeatureGraphModule:
        """Make the extractor from its graphs, holding the objects their ``call_module``/``get_attr`` name.

        Args:
            model: the user's model (buffers it keeps out of its state dict stay out of the extractor's).
            graphs: ``{"train": graph, "eval": graph}``; the same object twice when the modes do not differ.
            targets: what each target names: the model's objects, or fxfeat's copies and new modules.
            feature_info: what the outputs are.
            training: the mode the extractor starts in.
            class_name: name of the generated class.
            input_size: ``(C, H, W)`` the extractor was compiled (probed) at.
        """
        persistent = _persistent_buffers(model)
        non_persistent = sorted(
            target for target, value in targets.items()
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and target not in persistent
        )
        preserved = {"feature_info": feature_info, **({"input_size": tuple(input_size)} if input_size else {})}
        meta = {_PRESERVED: preserved, _NON_PERSISTENT: non_persistent}
        if graphs["train"] is not graphs["eval"]:
            meta[_GRAPHS] = dict(graphs)
        module = _assemble(cls, targets, graphs["train" if training else "eval"], class_name, meta, training)
        module.meta[_DROPPED_KEYS] = sorted(set(model.state_dict()) - set(module.state_dict()))
        return module

    def train(self, mode: bool = True) -> FeatureGraphModule:
        """Set the mode of the extractor and of the modules it holds, and run the graph traced in that mode.
        Norms ``fxfeat.freeze`` froze stay in eval mode."""
        super().train(mode)
        self.use_mode_graph()
        for path in self.eval_mode_norms:
            self.get_submodule(path).eval()
        return self

    def use_mode_graph(self) -> None:
        """Make the graph of the current mode the one ``forward`` runs (after module flags were set directly)."""
        graphs = self.meta.get(_GRAPHS)
        if graphs is not None and self._graph is not graphs["train" if self.training else "eval"]:
            self.graph = graphs["train" if self.training else "eval"]

    def __call__(self, *args, **kwargs):
        self.use_mode_graph()  # also when the flag was set without train(): `module.training = False`
        size = self.input_size
        image = args[0] if args else None
        if size is not None and isinstance(image, torch.Tensor) and image.dim() == len(size) + 1 and (
                image.shape[1] != size[0]):
            raise InputShapeError(
                f"this extractor takes images with {size[0]} channels (it was compiled for inputs of size {size}); "
                f"got an input of shape {tuple(image.shape)}.",
                hint=f"pass a batch of shape (N, {size[0]}, H, W).")
        return super().__call__(*args, **kwargs)

    def run_quietly(self, *args, **kwargs):
        """Call the extractor without torch.fx's print of its generated code when it raises: for probes whose
        failure is an answer (does the extractor run at another size?), not an error to report."""
        self.use_mode_graph()
        return self.forward(*args, **kwargs)

    @property
    def eval_mode_norms(self) -> tuple[str, ...]:
        """Paths of the norms :func:`fxfeat.freeze` keeps in eval mode whatever the extractor's mode."""
        return tuple(self.meta.get(_FROZEN_NORMS, ()))

    @eval_mode_norms.setter
    def eval_mode_norms(self, paths) -> None:
        self.meta[_FROZEN_NORMS] = sorted(set(paths))

    def copy_as(self, cls: type[FeatureGraphModule], mode: str = "eval") -> FeatureGraphModule:
        """A new extractor of class ``cls`` running this one's ``mode`` graph (``"eval"`` or ``"train"``) in that
        mode, with copies of the modules and tensors that graph uses (what ``optimize_for_inference`` rewrites).

        Example:
            >>> import torchvision, fxfeat
            >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,))
            >>> copied = extractor.copy_as(FeatureGraphModule)
            >>> copied.training, copied.get_submodule("conv1") is extractor.get_submodule("conv1")
            (False, False)
        """
        state = self._state()
        graphs = state["graphs"]
        records = graphs.get(mode, graphs.get("both"))
        used = {target for op, _, target, *_ in records["nodes"] if op in ("call_module", "get_attr")}
        state.update(
            cls=cls, training=mode == "train", graphs={"both": records},
            targets={target: value for target, value in state["targets"].items() if target in used},
            meta={key: value for key, value in state["meta"].items() if key != _GRAPHS},
        )
        module = _rebuild(copy.deepcopy(state))
        for layer in module.modules():  # the model's own modules, copied with their flags
            layer.training = mode == "train"
        return module

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        for key in self.meta.get(_DROPPED_KEYS, ()):  # a state dict of the whole model loads
            state_dict.pop(prefix + key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _state(self) -> dict[str, Any]:
        """What an equal extractor is rebuilt from (see :func:`_rebuild`)."""
        targets = {}
        for graph in {id(g): g for g in self.mode_graphs.values()}.values():
            targets.update(graph_targets(graph, self))
        meta = {key: value for key, value in self.meta.items() if key != _GRAPHS}
        graphs = self.mode_graphs
        same = graphs["train"] is graphs["eval"]
        cls = next(c for c in type(self).__mro__ if c.__qualname__.split(".")[-1] != "GraphModuleImpl")
        return dict(
            cls=cls, class_name=type(self).__name__, targets=targets, training=self.training, meta=meta,
            graphs={mode: _graph_records(graph) for mode, graph in graphs.items()} if not same else
            {"both": _graph_records(graphs["train"])},
        )

    def __reduce__(self):
        return _rebuild, (self._state(),)

    def __deepcopy__(self, memo: dict[int, Any]) -> FeatureGraphModule:
        result = _rebuild(copy.deepcopy(self._state(), memo))
        memo[id(self)] = result
        return result


def _persistent_buffers(model: nn.Module) -> set[str]:
    """Qualified names of the model's buffers that its state dict holds."""
    names = set()
    for path, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                names.add(f"{path}.{name}" if path else name)
    return names


def _install(module: nn.Module, target: str, value: object) -> None:
    """Put ``value`` at ``target`` in ``module``, creating plain containers on the way."""
    *path, field = target.split(".")
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        module.register_buffer(field, value)
    else:
        setattr(module, field, value)


def _assemble(cls, targets: dict[str, object], graph: fx.Graph, class_name: str, meta: dict[str, Any],
              training: bool) -> FeatureGraphModule:
    """An extractor running ``graph`` and holding ``targets`` (the given objects, at their paths), including
    those only the other mode's graph uses."""
    graphs = [graph, *(meta.get(_GRAPHS) or {}).values()]
    for graph_ in graphs:
        graph_._tracer_cls = None  # pickling must not need fxfeat's tracers
    used = {node.target for node in graph.nodes if node.op in ("call_module", "get_attr")}
    module = cls({target: value for target, value in targets.items() if target in used}, graph, class_name)
    non_persistent = set(meta.get(_NON_PERSISTENT, ()))
    for target in sorted(targets, key=lambda t: t.count(".")):
        owner_path, _, field = target.rpartition(".")
        if target not in used:
            _install(module, target, targets[target])
        if target in non_persistent:
            module.get_submodule(owner_path)._non_persistent_buffers_set.add(field)
    module.meta = dict(meta)
    _set_flags(module, training, {id(value) for value in targets.values() if isinstance(value, nn.Module)})
    return module


def _set_flags(module: nn.Module, training: bool, shared: set[int]) -> None:
    """Set the training flag of the extractor and the containers fxfeat made, not of the model's modules."""
    module.training = training
    for child in module._modules.values():
        if child is not None and id(child) not in shared:
            _set_flags(child, training, shared)


# --- rebuilding (pickle, deepcopy) --------------------------------------------------------------------------------

class _NodeRef:
    """A node in a graph record: its name."""

    def __init__(self, name: str):
        self.name = name


def _graph_records(graph: fx.Graph) -> dict[str, Any]:
    """A picklable description of ``graph``: each node's op, name, target, arguments (nodes by name) and type."""
    nodes = [
        (node.op, node.name, node.target, fx.node.map_arg(node.args, lambda n: _NodeRef(n.name)),
         fx.node.map_arg(node.kwargs, lambda n: _NodeRef(n.name)), node.type)
        for node in graph.nodes
    ]
    return {"nodes": nodes, "codegen": graph._codegen}


def _graph_from_records(records: dict[str, Any]) -> fx.Graph:
    graph = fx.Graph()
    graph._codegen = records["codegen"]
    made: dict[str, fx.Node] = {}

    def resolve(value):
        if isinstance(value, _NodeRef):
            return made[value.name]
        if isinstance(value, (list, tuple)):
            return type(value)(resolve(item) for item in value) if not hasattr(value, "_fields") else \
                type(value)(*(resolve(item) for item in value))
        if isinstance(value, dict):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, slice):
            return slice(resolve(value.start), resolve(value.stop), resolve(value.step))
        return value

    for op, name, target, args, kwargs, type_expr in records["nodes"]:
        made[name] = graph.create_node(op, target, resolve(args), resolve(kwargs), name=name, type_expr=type_expr)
    return graph


def _rebuild(state: dict[str, Any]) -> FeatureGraphModule:
    """The extractor described by ``FeatureGraphModule._state()`` (unpickling and deepcopy)."""
    records = state["graphs"]
    if "both" in records:
        graphs = dict.fromkeys(("train", "eval"), _graph_from_records(records["both"]))
    else:
        graphs = {mode: _graph_from_records(record) for mode, record in records.items()}
    meta = dict(state["meta"])
    if graphs["train"] is not graphs["eval"]:
        meta[_GRAPHS] = graphs
    return _assemble(state["cls"], state["targets"], graphs["train" if state["training"] else "eval"],
                     state["class_name"], meta, state["training"])
