"""The analysis of a traced model, in order: shapes at two probe sizes, in-place writes, the data-flow graph and its
dominator chain, the chain the levels lie on (with branches that mix bridged), the head, the levels and what
follows them. The result, :class:`GraphAnalysis`, is what the planner reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fxfeat.analyse.aliases import Aliases, annotate_aliases
from fxfeat.analyse.branches import bridge_branches
from fxfeat.analyse.dataflow import DataFlow
from fxfeat.analyse.heads import Head, find_head
from fxfeat.analyse.levels import (
    Level,
    StrideChange,
    find_levels,
    outermost_path,
    returned_versions,
    returning_calls,
)
from fxfeat.analyse.shapes import NodeShape, propagate_shapes
from fxfeat.trace import TracedModel
from fxfeat.trace.metadata import output_node

__all__ = ["GraphAnalysis", "analyse"]


@dataclass(frozen=True)
class GraphAnalysis:
    """Everything the planner needs to know about a traced model.

    Attributes:
        traced: the traced model.
        input_size: probe size (C, H, W).
        shapes: shape, layout and reduction of every tensor-valued node at the probe size; a write into a view
            of a tensor (``x[:, :c].add_(y)``) has the shape of the whole tensor, which it stands for.
        dataflow: the data-flow graph.
        aliases: storage sharing and in-place writes.
        write_tensors: for each write whose value is not what later code reads (a write into a slice), the node that
            code reads after it.
        returned_versions: for each write that is the last version of a tensor a module call returns, those
            calls' keys.
        chain: nodes every input-to-output path passes through, in order.
        levels: the levels discovered from the graph.
        stride_changes: where the reduction grows along the chain.
        isotropic: the levels are the blocks of an isotropic body (a ViT's), all at the final reduction.
        trunk: path of the module holding the stages (or a flat list of blocks); ``""``: the model itself.
        candidates: for each reduction, the feature maps of the chain at it that a module returns.
        head: the global pooling and the classifier, with the unpooled and pooled nodes.
        declared: the model's own timm-style ``feature_info`` (list of dicts), if it has one.
        decoder: when the resolution rises after the last level (an encoder-decoder), the outermost calls (or
            top-level functions) after it on the way to the output.
    """

    traced: TracedModel
    input_size: tuple[int, int, int]
    shapes: dict[str, NodeShape]
    dataflow: DataFlow
    aliases: Aliases
    write_tensors: dict[str, str]
    returned_versions: dict[str, list[str]]
    chain: tuple[str, ...]
    levels: tuple[Level, ...]
    stride_changes: tuple[StrideChange, ...]
    isotropic: bool
    trunk: str
    candidates: dict[int, tuple[str, ...]]
    head: Head
    declared: tuple[dict[str, Any], ...] | None
    decoder: tuple[str, ...] = ()

    def level_at(self, node: str, module: str | None = None) -> Level:
        """Describe an arbitrary node as a level (used for levels the user or the model names)."""
        shape = self.shapes.get(node)
        if module is None:
            module = outermost_path(self.traced, returning_calls(self.traced, node, self.returned_versions))
        return Level(
            node=node,
            module=module,
            reduction=shape.reduction if shape else None,
            channels=shape.channels if shape and shape.fmt else (shape.shape[0] if shape and shape.shape else None),
            fmt=shape.fmt if shape else None,
            shape=shape.shape if shape else (),
            candidates=self.candidates.get(shape.reduction, ()) if shape and shape.is_spatial else (),
            tensor=self.write_tensors.get(node),
            grid=shape.grid if shape else None,
        )


def _declared_feature_info(model: Any) -> tuple[dict[str, Any], ...] | None:
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # timm's FeatureInfo object keeps the list in .info
    if isinstance(info, Sequence) and info and all(isinstance(e, dict) and "module" in e for e in info):
        return tuple(dict(entry) for entry in info)
    return None


def _write_tensors(traced: TracedModel, aliases: Aliases, shapes: dict[str, NodeShape]) -> dict[str, str]:
    """Writes whose value is not the tensor later code reads (a write into a slice returns the slice; the code
    goes on with the whole tensor), mapped to the node that code reads after them."""
    write_tensors: dict[str, str] = {}
    read_directly: set[str] = set()
    for node in traced.graph.nodes:
        for argument in node.all_input_nodes:
            version = aliases.version_read(argument.name, by=node.name)
            if version == argument.name:
                read_directly.add(version)
            elif aliases.is_write(version) and argument.name in shapes:
                write_tensors.setdefault(version, argument.name)
    return {write: read for write, read in write_tensors.items() if write not in read_directly}


def _level_chain(traced: TracedModel, dataflow: DataFlow, chain: tuple[str, ...], shapes: dict[str, NodeShape]
                 ) -> tuple[str, ...]:
    """The chain the levels are found on: the output's dominator chain, unless the model computes a coarser map
    than any on it, which then rejoins finer ones (a decoder, a fusion head). The levels are then on the
    dominator chain of the last map at the coarsest reduction: the encoder's pyramid. A coarser map inside a
    module call that returns only finer maps (an attention computing its keys and values on a coarser grid, as
    in CvT) is that call's internal affair, not an encoder's output."""

    def hidden(name: str, coarse: int) -> bool:
        for key in traced.node_calls.get(name, ()):
            returned = [shapes.get(output) for output in traced.calls[key].outputs] if key in traced.calls else []
            returned = [shape for shape in returned if shape is not None and shape.is_spatial]
            if returned and all(shape.reduction < coarse for shape in returned):
                return True
        return False

    reduction = {  # of the maps the input flows through to the output, 0 for every other node
        name: shape.reduction if shape.is_spatial and dataflow.depends_on_input(name) and dataflow.feeds_output(name)
        else 0
        for name, shape in shapes.items()
    }
    on_chain = max((reduction.get(name, 0) for name in chain), default=0)
    coarser = [name for name, r in reduction.items() if r > on_chain and not hidden(name, r)]
    if not coarser:
        return chain
    deepest = max(reduction[name] for name in coarser)
    sink = max((name for name in coarser if reduction[name] == deepest), key=dataflow.order.__getitem__)
    return dataflow.dominator_chain(sink)


def _decoder(traced: TracedModel, dataflow: DataFlow, shapes: dict[str, NodeShape], levels: tuple[Level, ...]
             ) -> tuple[str, ...]:
    """When the resolution rises again after the last level (an encoder-decoder, a segmentation head that
    upsamples): the outermost module calls, or top-level functions, computed from the last level on the way to
    the output, in order. Empty when nothing after the last level is finer than it."""
    if not levels or shapes.get(levels[-1].node) is None or not shapes[levels[-1].node].is_spatial:
        return ()
    last, deepest = levels[-1].node, shapes[levels[-1].node].reduction
    after = {name for name in dataflow.computed_from(last) if dataflow.feeds_output(name)}

    def finer(name: str) -> bool:
        shape = shapes.get(name)
        return shape is not None and shape.is_spatial and shape.reduction < deepest

    if not any(finer(name) for name in after):
        return ()
    def outermost(name: str) -> str:
        stack = traced.node_calls.get(name, ())
        return traced.calls[stack[0]].path if stack and stack[0] in traced.calls else name

    parts = {outermost(node.name): None for node in traced.graph.nodes
             if node.name in after and node.op != "output" and node.name in shapes}
    parts.pop(outermost(last), None)  # the encoder the last level lies in
    return tuple(parts)


def _main_chain(traced: TracedModel, dataflow: DataFlow) -> tuple[str, ...]:
    """Nodes every input-to-output path passes through. For a model that returns several tensors (logits beside
    auxiliary logits or maps, a segmenter's main and auxiliary outputs), each returned tensor is a sink: the
    chain is that of the one computed furthest from the input (the longest dominator chain; the first returned
    on a tie), followed by the output node, so a shallower auxiliary output does not cut the chain short."""
    output = output_node(traced.graph)
    returned = [name for name in dict.fromkeys(node.name for node in output.all_input_nodes)
                if dataflow.depends_on_input(name)]
    if len(returned) < 2:
        return dataflow.dominator_chain()
    chains = [dataflow.dominator_chain(name) for name in returned]
    return max(chains, key=len) + (output.name,)


def analyse(traced: TracedModel, input_size: tuple[int, int, int]) -> GraphAnalysis:
    """Run every analysis on ``traced`` with probes of ``input_size`` (C, H, W)."""
    shapes = propagate_shapes(traced.graph_module, input_size)
    annotate_aliases(traced.graph, traced.root, tensor_nodes=set(shapes))
    aliases = Aliases(traced.graph)
    write_tensors = _write_tensors(traced, aliases, shapes)
    shapes = {**shapes, **{write: shapes[base] for write, base in write_tensors.items()}}
    dataflow = DataFlow(traced.graph, aliases)
    chain = _main_chain(traced, dataflow)
    versions = returned_versions(traced, aliases)
    level_chain = bridge_branches(traced, dataflow, _level_chain(traced, dataflow, chain, shapes), shapes, versions)
    head = find_head(traced, chain, shapes)
    fully_convolutional = head.map_classifier is not None
    search = find_levels(traced, level_chain, shapes, versions, write_tensors,
                         head_begins_after=head.unpooled if fully_convolutional else None)
    return GraphAnalysis(
        traced=traced, input_size=tuple(input_size), shapes=shapes, dataflow=dataflow, aliases=aliases,
        write_tensors=write_tensors, returned_versions=versions, chain=chain,
        levels=search.levels, stride_changes=search.stride_changes, isotropic=search.isotropic, trunk=search.trunk,
        candidates=search.candidates, head=head, decoder=_decoder(traced, dataflow, shapes, search.levels),
        declared=_declared_feature_info(traced.root),
    )
