"""``fxfeat.compile`` and ``fxfeat.inspect``: the pipeline as a short list of named steps.

trace -> analyse -> plan -> rewrite -> build (``inspect`` stops after plan; ``compile_inspected`` gives both from
one trace).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fxfeat.analyse import GraphAnalysis, Head, analyse
from fxfeat.analyse.aliases import annotate_aliases
from fxfeat.errors import FxFeatWarning
from fxfeat.feature_info import FeatureInfo
from fxfeat.module import FeatureGraphModule
from fxfeat.passes import (
    attach_classifier,
    bind_optional_inputs,
    dilate,
    expose_outputs,
    remove_dead_code,
    replay_head,
    run_passes,
    snapshot_outputs,
    with_plan,
)
from fxfeat.plan import make_plan, make_request
from fxfeat.plan.output_stride import check_output_stride
from fxfeat.plan.plan import NEW_CLASSIFIER, format_table
from fxfeat.trace import TracedModes, eager_model, evaluation_mode, graph_targets, model_state_kept, trace_modes
from fxfeat.trace.align import AlignmentError
from fxfeat.trace.lock import trace_lock

__all__ = ["compile", "compile_inspected", "inspect", "Inspection"]


def compile(
    model: nn.Module,
    *,
    mode: str = "features",
    out_indices: int | tuple[int, ...] | None = None,
    output_stride: int | None = None,
    levels: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    output_fmt: str = "NCHW",
    return_dict: bool = False,
    num_classes: int | None = None,
) -> FeatureGraphModule:
    """Compile ``model`` into a feature extractor.

    Args:
        model: any ``nn.Module`` taking one image batch. It is never modified.
        mode: ``"features"`` returns a feature pyramid (a list or dict); ``"unpooled"`` the last feature map
            before the global pooling (timm's ``forward_features``); ``"pooled"`` the vector before the model's
            final linear maps (a classifier, a projection: timm's ``forward_head(..., pre_logits=True)``), or the
            model's own vector where it ends in none (a headless model, an attention pool); ``"embedding"`` (or
            its other name, ``"logits"``) the model's own final per-image vector, after its final linear maps (a
            CLIP tower's projected embedding, a classifier's logits). All but ``"features"`` return one tensor;
            the head features are also names in ``levels=[...]``, to get them beside the pyramid in one pass.
            See docs/heads.md.
        out_indices: which levels to return, as in timm: ``None`` all of them, an int ``n`` the last ``n``,
            a tuple the given indices, in increasing order (negative ones count from the end; indices out of
            order or repeated raise ``OutIndicesError``: the outputs come from the finest level to the coarsest).
        output_stride: ``8``, ``16`` or ``32`` lowers the model's output stride to that value by removing the
            strides of later convolutions and poolings and dilating what follows (timm's ``output_stride``,
            torchvision's ``replace_stride_with_dilation``); ``None`` keeps the native stride. Rewritten modules
            are copies. Raises ``OutputStrideError`` where the model cannot run denser (patch embeddings...).
        levels: ``None`` uses the model's declared timm-style ``feature_info`` if it has one and fxfeat can place
            it (a declared module missing from the graph takes the level found at its reduction), else discovers
            the levels; ``"auto"`` always discovers them from the graph; ``"declared"`` insists on the declared
            ones (``DeclaredLevelError`` if one cannot be placed); a list of module paths, fx node
            names or head features (``"unpooled"``, ``"pooled"``, ``"embedding"``, ``"logits"``) picks them.
        input_size: ``(C, H, W)`` of the probe input; default from the model's ``pretrained_cfg`` or
            ``default_cfg`` (timm), or its ``config``'s ``num_channels`` and ``image_size`` (Hugging Face),
            else ``(3, 224, 224)``; with the channels of the graph's first convolution where it
            takes another number (timm's ``in_chans=1`` models keep a 3-channel config). The extractor works at
            any size the model accepts.
        output_fmt: ``"NCHW"`` permutes channels-last maps to NCHW; ``"native"`` returns them as computed.
        return_dict: return a dict keyed by level name instead of a list.
        num_classes: with ``mode="pooled"``, put a new ``nn.Linear(C, num_classes)`` head on the pooled features
            (timm's ``reset_classifier``); ``0`` is plain ``pooled``.

    Returns:
        A :class:`FeatureGraphModule` (a ``torch.fx.GraphModule``) with ``feature_info``. It keeps only the
        submodules and parameters the returned levels need, which are ``model``'s own objects (copies only where
        fxfeat rewrites a module), and is in ``model``'s training mode. ``.eval()`` runs the graph traced in eval
        mode, ``.train()`` the one traced in train mode (see :mod:`fxfeat.module`).

    Example:
        >>> import torch, torchvision, fxfeat
        >>> extractor = fxfeat.compile(torchvision.models.resnet50(), out_indices=(1, 2, 3, 4))
        >>> extractor.feature_info.channels(), extractor.feature_info.reduction()
        ([256, 512, 1024, 2048], [4, 8, 16, 32])
        >>> [tuple(f.shape) for f in extractor.eval()(torch.randn(1, 3, 224, 224))][-1]
        (1, 2048, 7, 7)
    """
    model = eager_model(model)
    request = make_request(
        model, mode=mode, out_indices=out_indices, output_stride=output_stride, levels=levels,
        input_size=input_size, output_fmt=output_fmt, return_dict=return_dict, num_classes=num_classes,
    )
    # One thread at a time traces, probes and changes models or torch (fxfeat.trace.lock); the model's flags,
    # buffers and the random state are as they were after compiling.
    with trace_lock(), model_state_kept(model):
        modes, analysis, request = _analysed(model, request, size_given=input_size is not None)
        return _built(model, modes, analysis, request)


def compile_inspected(
    model: nn.Module,
    choose: Callable[[Inspection], list[str]],
    *,
    levels: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    out_indices: int | tuple[int, ...] | None = None,
    output_stride: int | None = None,
) -> tuple[Inspection, FeatureGraphModule]:
    """What ``inspect(model, levels=levels, input_size=input_size, out_indices=out_indices)`` reports, and the
    extractor of ``compile(model, levels=choose(report), input_size=report.input_size,
    output_stride=output_stride)``, from one trace and one analysis of the model: for a caller whose levels to
    compile depend on those inspect finds (``fxfeat.extract`` names its features by them).

    Example:
        >>> import torchvision
        >>> report, extractor = compile_inspected(torchvision.models.resnet18(),
        ...                                       lambda report: [report.levels[-1].node, "pooled"])
        >>> len(report.levels), extractor.feature_info.reduction()
        (5, [32, None])
    """
    model = eager_model(model)
    request = make_request(model, levels=levels, input_size=input_size, out_indices=out_indices)
    with trace_lock(), model_state_kept(model):
        modes, analysis, request = _analysed(model, request, size_given=input_size is not None)
        report = _inspection(model, modes, analysis, make_plan(analysis, request))
        chosen = make_request(model, levels=choose(report), input_size=report.input_size,
                              output_stride=output_stride)
        return report, _built(model, modes, analysis, chosen)


def _analysed(model: nn.Module, request, size_given: bool, train_mode: bool = True):
    """The model traced (in eval mode, and in train mode with ``train_mode``) and its eval graph analysed, with
    the request at the input size the model takes."""
    with evaluation_mode(model):
        modes = trace_modes(model, request.input_size, size_given=size_given, train_mode=train_mode)
        request = replace(request, input_size=modes.input_size)
        return modes, analyse(modes.traced, request.input_size), request


def _built(model: nn.Module, modes: TracedModes, analysis: GraphAnalysis, request) -> FeatureGraphModule:
    """The extractor ``request`` asks of an analysed model: planned, rewritten in both modes, built."""
    plan = make_plan(analysis, request)
    evaluated, trained = _rewritten_modes(modes, analysis, plan)
    feature_info = _feature_info(plan, evaluated, request.input_size)
    graphs, targets = _mode_graphs(evaluated, trained)
    return FeatureGraphModule.build(
        model, graphs, targets, feature_info, training=model.training,
        class_name=f"{modes.traced.model_name}Features", input_size=request.input_size,
    )


_PASSES = (bind_optional_inputs, replay_head, attach_classifier, dilate, expose_outputs, remove_dead_code,
           snapshot_outputs, remove_dead_code)


def _rewritten(root: nn.Module | dict, graph: torch.fx.Graph, plan) -> torch.fx.GraphModule:
    """A GraphModule over a copy of ``graph`` and what ``root`` holds for it, rewritten by the compile passes."""
    module = torch.fx.GraphModule(root, copy.deepcopy(graph))
    run_passes(module, [with_plan(pass_, plan) for pass_ in _PASSES])
    return module


def _rewritten_modes(modes: TracedModes, analysis: GraphAnalysis, plan
                     ) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """The eval-mode and train-mode GraphModules, rewritten by the same passes with the same plan (the train
    rewrite shares the eval rewrite's new classifier). Where the train graph could not be built or lacks a node
    the plan needs, the extractor runs the eval graph in both modes, with a warning."""
    traced = modes.traced
    evaluated = _rewritten(traced.graph_module, traced.graph, plan)
    try:
        if isinstance(modes.training, Exception):
            raise modes.training
        aligned, train_targets = modes.training
        missing = plan.node_names() - {node.name for node in aligned.nodes}
        if missing:
            raise AlignmentError(f"no train-mode counterpart for node(s) {sorted(missing)}")
        added = {node.name for node in aligned.nodes if node.name.startswith("training_")}
        annotate_aliases(aligned, traced.root, tensor_nodes=set(analysis.shapes) | added)
        shared = {NEW_CLASSIFIER: evaluated.get_submodule(NEW_CLASSIFIER)} if plan.classifier is not None else {}
        return evaluated, _rewritten({**train_targets, **shared}, aligned, plan)
    except Exception as error:
        warnings.warn(
            f"fxfeat could not build the train-mode graph of {traced.model_name} ({type(error).__name__}: "
            f"{error}); the extractor runs the eval-mode graph in .train() too, so Python that only runs in "
            "training (drop path, F.dropout(x, p, self.training)) stays off. Modules (nn.Dropout, batch norm) "
            "still follow .train().",
            FxFeatWarning, stacklevel=3,
        )
        return evaluated, evaluated


def _mode_graphs(evaluated: torch.fx.GraphModule, trained: torch.fx.GraphModule
                 ) -> tuple[dict[str, torch.fx.Graph], dict]:
    """Each mode's graph (the same object when they do not differ) and what their targets name (the model's
    modules, and the copies and new modules the passes made)."""
    eval_graph, train_graph = evaluated.graph, trained.graph
    if train_graph.python_code("self").src == eval_graph.python_code("self").src:
        train_graph = eval_graph
    return {"train": train_graph, "eval": eval_graph}, {**graph_targets(train_graph, trained),
                                                       **graph_targets(eval_graph, evaluated)}


def _feature_info(plan, evaluated: torch.fx.GraphModule, input_size) -> FeatureInfo:
    """The extractor's ``feature_info``: the plan's, where ``output_stride`` rewrote the model with the shapes
    the rewritten eval graph computes at the probe size (checked to have the planned reductions; levels not
    returned get no shape)."""
    entries = plan.feature_info()
    if plan.op_edits:
        shapes = check_output_stride(evaluated, plan, input_size)
        for entry in entries:
            entry["shape"] = None
        for index, shape in zip(plan.out_indices, shapes):  # shapes of the returned (already permuted) tensors
            entries[index]["shape"] = shape
    return FeatureInfo(entries, plan.out_indices)


@dataclass(frozen=True)
class LevelReport:
    """One row of :class:`Inspection`."""

    index: int
    module: str
    node: str
    channels: int | None
    reduction: int | None
    shape: tuple[int, ...]
    parameters: int
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class Inspection:
    """What fxfeat sees in a model: its levels with their candidate nodes, and the parameters each keeps.

    Attributes:
        model_name: class name of the model.
        input_size: probe size (C, H, W).
        source: where the levels come from (``"declared"``, ``"discovered"``, ``"user"``).
        levels: one report per level.
        total_parameters: parameters of the whole model.
        opaque_modules: submodules torch.fx could not trace through, with the reason.
        head: the global pooling and classifier found, with the unpooled and pooled nodes (``None``: none).
        decoder: for an encoder-decoder net, the calls after the encoder that raise the resolution again.
        out_indices: the levels ``compile`` returns for the ``out_indices`` given to ``inspect`` (``None``: by
            default: all, or an isotropic model's last three blocks).
    """

    model_name: str
    input_size: tuple[int, int, int]
    source: str
    levels: tuple[LevelReport, ...]
    total_parameters: int
    opaque_modules: dict[str, str]
    head: Head
    decoder: tuple[str, ...] = ()
    out_indices: tuple[int, ...] = ()

    def __str__(self) -> str:
        origin = {"declared": "declared by the model", "discovered": "discovered from the graph",
                  "user": "chosen by the user"}[self.source]
        rows = [
            (r.index, r.module or "-", r.node, r.channels, r.reduction, "x".join(map(str, r.shape)),
             f"{r.parameters / 1e6:.2f}M", ", ".join(c for c in r.candidates if c != r.node) or "-")
            for r in self.levels
        ]
        lines = [
            f"{self.model_name}: {len(self.levels)} levels ({origin}) at input size {self.input_size}; "
            f"{self.total_parameters / 1e6:.2f}M parameters in the model",
            format_table(("index", "module", "node", "channels", "reduction", "shape", "params kept",
                          "other candidates"), rows),
        ]
        lines.extend(_head_lines(self.head))
        if self.decoder:
            lines.append(f"  decoder (after the encoder's levels): {', '.join(self.decoder)}")
        for path, reason in self.opaque_modules.items():
            lines.append(f"  opaque: {path} ({reason})")
        return "\n".join(lines)


def _head_lines(head: Head) -> list[str]:
    """Where the head features come from: the map before the global pool, the vector before the final linear maps
    (or the operations replayed for it), the model's own vector."""
    final = head.final
    linear = f"final linear maps: {', '.join(final.linear)}" if final.linear else "no final linear map"
    lines = [f"  unpooled: {head.unpooled or '-'} -> global pool: {head.global_pool or 'none found'}",
             f"  pooled: {head.pooled or '-'} -> {linear} -> embedding/logits: {head.embedding or '-'}"]
    if final.replay:
        lines.append(f"  pooled is computed again without the final linear maps: "
                     f"{'; '.join(str(step) for step in final.replay)}")
    return lines


def _parameters_needed(analysis: GraphAnalysis, node: str) -> int:
    """Number of parameters needed to compute ``node``."""
    gm = analysis.traced.graph_module
    graph_nodes = {n.name: n for n in gm.graph.nodes}
    seen: dict[int, int] = {}
    for name in analysis.dataflow.ancestors([node]):
        fx_node = graph_nodes[name]
        if fx_node.op == "call_module":
            tensors = list(gm.get_submodule(fx_node.target).parameters())
        elif fx_node.op == "get_attr":
            try:
                tensors = [gm.get_parameter(fx_node.target)]
            except AttributeError:  # a buffer or a constant, not a parameter
                tensors = []
        else:
            tensors = []
        for tensor in tensors:
            seen[id(tensor)] = tensor.numel()
    return sum(seen.values())


def inspect(
    model: nn.Module, *, levels: str | list[str] | None = None, input_size: tuple[int, int, int] | None = None,
    out_indices: int | tuple[int, ...] | None = None,
) -> Inspection:
    """Show every level fxfeat finds (or the given ``levels``) with candidates, shapes and parameters kept, and
    which of them ``compile`` returns for ``out_indices`` (``Inspection.out_indices``).

    Example:
        >>> import torchvision, fxfeat
        >>> report = fxfeat.inspect(torchvision.models.resnet18())
        >>> [(level.module, level.channels, level.reduction) for level in report.levels][:2]
        [('relu', 64, 2), ('layer1', 64, 4)]
        >>> print(str(report).splitlines()[0])
        ResNet: 5 levels (discovered from the graph) at input size (3, 224, 224); 11.69M parameters in the model
        >>> report.head.global_pool, report.head.classifier
        ('avgpool', 'fc')
        >>> fxfeat.inspect(torchvision.models.resnet18(), out_indices=2).out_indices
        (3, 4)
    """
    model = eager_model(model)
    request = make_request(model, levels=levels, input_size=input_size, out_indices=out_indices)
    with trace_lock(), model_state_kept(model):  # one thread at a time (fxfeat.trace.lock)
        modes, analysis, request = _analysed(model, request, size_given=input_size is not None, train_mode=False)
    return _inspection(model, modes, analysis, make_plan(analysis, request))


def _inspection(model: nn.Module, modes: TracedModes, analysis: GraphAnalysis, plan) -> Inspection:
    """The report of ``plan``'s levels over an analysed model."""
    reports = tuple(
        LevelReport(
            index=i, module=level.module, node=level.node, channels=level.channels, reduction=level.reduction,
            shape=level.shape, parameters=_parameters_needed(analysis, level.node), candidates=level.candidates,
        )
        for i, level in enumerate(plan.levels)
    )
    return Inspection(
        model_name=modes.traced.model_name,
        input_size=modes.input_size,
        source=plan.source,
        levels=reports,
        total_parameters=sum(p.numel() for p in model.parameters()),
        opaque_modules=dict(modes.traced.opaque_modules),
        head=analysis.head,
        decoder=analysis.decoder,
        out_indices=plan.out_indices,
    )
