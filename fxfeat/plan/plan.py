"""The extraction plan: which nodes become which outputs. A pure function of (analysis, request).

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> from fxfeat.plan import make_plan, make_request
    >>> model = torchvision.models.resnet18().eval()
    >>> request = make_request(model, out_indices=(1, 3))
    >>> print(make_plan(analyse(trace_model(model), request.input_size), request))
    ExtractionPlan (levels discovered from the graph, 2 of 5 returned as a list)
      index  name    node             channels  reduction  fmt
      1      layer1  layer1_1_relu_1  64        4          NCHW
      3      layer3  layer3_1_relu_1  256       16         NCHW
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from fxfeat.analyse import GraphAnalysis, Level
from fxfeat.analyse.final_maps import ReplayStep
from fxfeat.analyse.shapes import TokenGrid
from fxfeat.errors import (
    DeclaredLevelError,
    FxFeatWarning,
    InvalidRequestError,
    NoFeatureMapsError,
    OutIndicesError,
    ProbeTooSmallError,
)
from fxfeat.plan.head import HEAD_FEATURES, head_level
from fxfeat.plan.named import declared_levels, named_level
from fxfeat.plan.names import output_name, output_names
from fxfeat.plan.output_stride import OpEdit, plan_output_stride
from fxfeat.plan.request import Request

__all__ = ["ExtractionPlan", "PlannedOutput", "make_plan", "format_table"]

_TO_NCHW = {"NHWC": (0, 3, 1, 2)}
NEW_CLASSIFIER = "new_classifier"


@dataclass(frozen=True)
class PlannedOutput:
    """One returned tensor.

    Attributes:
        name: key of the output when the extractor returns a dict.
        node: the fx node whose value is returned.
        permute: dimension order applied to the node's value before returning it (``None``: as is).
        fmt: layout of the returned tensor.
        version: the node after which the value is read (``node`` itself, or an in-place write into it); a later
            write into the same tensor must not reach the output.
        tokens: for a token sequence returned as an ``NCHW`` map, its layout (``"NLC"``/``"NCL"``) and grid: the
            prefix tokens are dropped and the rest reshaped to the grid.
        shape: per-sample shape of the returned tensor at the probe size.
    """

    name: str
    node: str
    permute: tuple[int, ...] | None
    fmt: str | None
    version: str | None = None
    tokens: tuple[str, TokenGrid] | None = None
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ExtractionPlan:
    """Which levels exist, which are returned and how.

    Attributes:
        levels: every level of the model, in order.
        out_indices: indices of the returned levels.
        outputs: one entry per returned level, in output order.
        return_dict: return a dict keyed by output name instead of a list.
        source: where the levels come from: ``"declared"``, ``"discovered"``, ``"user"``, or the penultimate
            node of ``mode="unpooled"``/``"pooled"``.
        single: return the one output as a tensor (modes ``"unpooled"`` and ``"pooled"``).
        classifier: ``(pooled node, in_features, num_classes)`` of a new linear head on the pooled features.
        op_edits: stride/dilation/padding changes of the ``output_stride`` rewrite.
        output_stride: the requested output stride (``None``: native).
        output_fmt: the requested layout of returned maps (``"NCHW"`` or ``"native"``).
        isotropic: the levels are the blocks of an isotropic body (a ViT's).
        replay: operations the graph does not hold that compute a returned vector (``pooled`` after two averaged
            heads is the average of their inputs), inserted before the outputs are exposed.
    """

    levels: tuple[Level, ...]
    out_indices: tuple[int, ...]
    outputs: tuple[PlannedOutput, ...]
    return_dict: bool
    source: str
    single: bool = False
    classifier: tuple[str, int, int] | None = None
    op_edits: tuple[OpEdit, ...] = ()
    output_stride: int | None = None
    output_fmt: str = "NCHW"
    isotropic: bool = False
    replay: tuple[ReplayStep, ...] = ()

    def node_names(self) -> set[str]:
        """Every node of the traced graph the rewrite passes look up by name."""
        names = {edit.node for edit in self.op_edits}
        if self.classifier is not None and self.classifier[0] not in {step.name for step in self.replay}:
            names.add(self.classifier[0])
        replayed = {step.name for step in self.replay}
        names.update(ref.name for step in self.replay for ref in step.references() if ref.name not in replayed)
        for output in self.outputs:
            names.update(name for name in (output.node, output.version) if name and name != NEW_CLASSIFIER
                         and name not in replayed)
            if output.tokens is not None:
                names.add(output.tokens[1].source)
        return names

    def feature_info(self) -> list[dict[str, Any]]:
        """timm-style info dicts for every level, describing the tensors as they are returned (the levels not
        returned as they would be), with the layout the model computes (``native_fmt``) and the number of
        prefix tokens dropped from a token sequence (``num_prefix_tokens``), and which head feature a level is
        (``head``: ``"unpooled"``, ``"pooled"``, ``"embedding"``, ``"logits"``; ``None`` for the pyramid's)."""
        planned = dict(zip(self.out_indices, self.outputs))
        entries = []
        for index, level in enumerate(self.levels):
            output = planned.get(index) or _output(level, self.output_fmt)
            entries.append(
                dict(
                    num_chs=level.channels,
                    reduction=level.reduction,
                    module=level.module,
                    node=level.node,
                    fmt=output.fmt,
                    shape=output.shape,
                    index=index,
                    native_fmt=level.fmt,
                    num_prefix_tokens=level.grid.prefix if level.grid else 0,
                    module_output=level.module_output,
                    head=level.key if level.key in HEAD_FEATURES else None,
                )
            )
        return entries

    def __str__(self) -> str:
        origin = _ORIGINS[self.source]
        kind = "a dict" if self.return_dict else ("a tensor" if self.single else "a list")
        rows = [
            (index, output.name, output.node, level.channels, level.reduction, output.fmt)
            for index, output in zip(self.out_indices, self.outputs)
            for level in [self.levels[index]]
        ]
        header = f"ExtractionPlan (levels {origin}, {len(self.outputs)} of {len(self.levels)} returned as {kind})"
        return header + "\n" + format_table(("index", "name", "node", "channels", "reduction", "fmt"), rows)


_ORIGINS = {
    "declared": "the model's declared feature_info",
    "discovered": "discovered from the graph",
    "user": "chosen by the user",
    "unpooled": "the last feature map before the global pooling",
    "pooled": "the input of the final linear maps, or the model's own vector where it ends in none",
    "embedding": "the model's own final vector",
    "logits": "the model's own final vector",
}


def format_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A plain-text table, two spaces between columns, indented by two."""
    cells = [tuple(map(str, header))] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _describe(levels: tuple[Level, ...]) -> str:
    return "\n".join(
        f"  {i}: {level.module or level.node} ({level.channels} channels, reduction {level.reduction})"
        for i, level in enumerate(levels)
    )


def _check_probe_resolves(analysis: GraphAnalysis, levels: tuple[Level, ...]) -> None:
    """A feature map 1 pixel high or wide, up to the last level, means the probe cannot tell reductions apart."""
    last = max((analysis.chain.index(level.node) for level in levels if level.node in analysis.chain), default=-1)
    names = [*analysis.chain[: last + 1], *(level.node for level in levels)]
    for name in names:
        shape = analysis.shapes.get(name)
        if shape is None or not shape.is_map:
            continue
        spatial = shape.shape[1:] if shape.fmt == "NCHW" else shape.shape[:2]
        if min(spatial) <= 1:
            calls = [analysis.traced.calls[key] for key in analysis.traced.node_calls.get(name, ())
                     if key in analysis.traced.calls]
            where = f" (in {calls[-1].path})" if calls else ""
            raise ProbeTooSmallError(
                f"input_size {analysis.input_size} is too small to tell the levels of "
                f"{analysis.traced.model_name} apart: node {name!r}{where} is a {'x'.join(map(str, spatial))} map at "
                "this size, so the reductions around it cannot be measured.",
                hint="pass a larger input_size, e.g. the size the model was designed for; the extractor still runs "
                "at any input size the model accepts.",
            )


def _choose_levels(analysis: GraphAnalysis, request: Request) -> tuple[tuple[Level, ...], str]:
    if isinstance(request.levels, tuple):
        levels = tuple(named_level(analysis, name) for name in request.levels)
        by_node: dict[str, list[str]] = {}
        for name, level in zip(request.levels, levels):
            by_node.setdefault(level.node, []).append(name)
        same = [names for names in by_node.values() if len([n for n in names if n not in HEAD_FEATURES]) > 1]
        if same:
            node = levels[request.levels.index(same[0][0])].node
            raise InvalidRequestError(
                f"levels {' and '.join(map(repr, same[0]))} are the same tensor (node {node!r}).",
                hint="list each level once.",
            )
        return levels, "user"
    if request.levels == "declared" or (request.levels is None and analysis.declared):
        if not analysis.declared:
            raise DeclaredLevelError(
                f"levels='declared' asks for the levels {analysis.traced.model_name} declares, but it has no "
                "timm-style feature_info.",
                hint="use levels=None or 'auto' to discover the levels from the graph.",
            )
        try:
            declared = declared_levels(analysis)
        except DeclaredLevelError as error:
            if request.levels == "declared":
                raise
            warnings.warn(f"{error.message} Discovering the levels from the graph instead.", FxFeatWarning,
                          stacklevel=4)
        else:
            _check_probe_resolves(analysis, declared)
            return declared, "declared"
    if not analysis.levels:
        raise NoFeatureMapsError(
            f"{analysis.traced.model_name} computes no spatial feature map at input size "
            f"{analysis.input_size}: no tensor on the input-to-output path has dimensions that follow the "
            "input's height and width.",
            hint="fxfeat extracts features from image models; check input_size, or pick nodes yourself with "
            "levels=[...].",
        )
    _check_probe_resolves(analysis, analysis.levels)
    return analysis.levels, "discovered"


ISOTROPIC_DEFAULT = 3  # timm's features_only returns the last three blocks of a ViT unless told otherwise


def _select(out_indices: int | tuple[int, ...] | None, levels: tuple[Level, ...], isotropic: bool = False
            ) -> tuple[int, ...]:
    count = len(levels)
    if out_indices is None:
        return tuple(range(max(0, count - ISOTROPIC_DEFAULT) if isotropic else 0, count))
    if isinstance(out_indices, int):
        if not 0 < out_indices <= count:
            raise OutIndicesError(
                f"out_indices={out_indices} asks for the last {out_indices} levels, but the model has {count}:\n"
                + _describe(levels),
                hint=f"use an int from 1 to {count}, or a tuple of indices.",
            )
        return tuple(range(count - out_indices, count))
    selected = []
    for index in out_indices:
        absolute = index + count if index < 0 else index
        if not 0 <= absolute < count:
            raise OutIndicesError(
                f"out_indices {out_indices} selects level {index}, but the model has {count} levels "
                f"(indices 0 to {count - 1}, or -{count} to -1):\n" + _describe(levels),
                hint="pick indices from the list above.",
            )
        selected.append(absolute)
    if any(later <= earlier for earlier, later in zip(selected, selected[1:])):
        raise OutIndicesError(
            f"out_indices {out_indices} must select levels in increasing order, each once (levels "
            f"{tuple(selected)} of {count}); the extractor returns them from the finest to the coarsest.",
            hint=f"use out_indices={tuple(sorted(set(selected)))}, and reorder the outputs yourself if needed.",
        )
    return tuple(selected)


def _output_name(level: Level) -> str:
    return output_name(level.key or level.module or level.node)


def _output(level: Level, output_fmt: str) -> PlannedOutput:
    node, name = level.tensor or level.node, _output_name(level)
    if output_fmt == "NCHW" and level.grid is not None:
        tokens = (level.fmt, level.grid)
        return PlannedOutput(name, node, None, "NCHW", version=level.node, tokens=tokens,
                             shape=(level.channels, *level.grid.size))
    permute = _TO_NCHW.get(level.fmt) if output_fmt == "NCHW" else None
    fmt = "NCHW" if permute else (level.fmt or ("NC" if len(level.shape) == 1 else None))
    shape = tuple(level.shape[d - 1] for d in permute[1:]) if permute else level.shape
    return PlannedOutput(name, node, permute, fmt, version=level.node, shape=shape)


def _replay(analysis: GraphAnalysis, levels: list[Level]) -> tuple[ReplayStep, ...]:
    """The operations recomputed for ``levels``: the head's replay where one is its ``pooled`` vector."""
    final = analysis.head.final
    return final.replay if any(level.node == final.pooled for level in levels) else ()


def _unique_names(outputs: tuple[PlannedOutput, ...]) -> tuple[PlannedOutput, ...]:
    """Outputs whose names (the dict keys) are unique, by the rule of :mod:`fxfeat.plan.names`: a name shared by
    several levels (two nodes of one module) becomes the node's name for every level after the first."""
    names = output_names([output.name for output in outputs], fallbacks=[output.node for output in outputs])
    return tuple(dataclasses.replace(output, name=name) for output, name in zip(outputs, names))


def make_plan(analysis: GraphAnalysis, request: Request) -> ExtractionPlan:
    """Choose the levels and the returned outputs.

    Raises:
        NoFeatureMapsError: the model has no spatial feature map.
        OutIndicesError: ``out_indices`` selects a level that does not exist.
        UnknownLevelError: a name in ``levels=[...]`` is not in the graph.
        HeadNotFoundError: ``mode="unpooled"`` found no global pooling, or ``"pooled"``/``"embedding"`` no vector
            per image.
    """
    if request.mode != "features":
        level, replay = head_level(analysis, request.mode)
        if not request.num_classes:
            levels, outputs, classifier = (level,), (_output(level, request.output_fmt),), None
        else:
            logits = Level(NEW_CLASSIFIER, NEW_CLASSIFIER, None, request.num_classes, "NC", (request.num_classes,))
            levels, outputs = (logits,), (PlannedOutput(NEW_CLASSIFIER, NEW_CLASSIFIER, None, "NC"),)
            classifier = (level.node, level.channels, request.num_classes)
        out_indices, source, single, isotropic = (0,), request.mode, True, False
    else:
        levels, source = _choose_levels(analysis, request)
        isotropic = analysis.isotropic and source != "user"
        out_indices = _select(request.out_indices, levels, isotropic)
        outputs = _unique_names(tuple(_output(levels[index], request.output_fmt) for index in out_indices))
        replay = _replay(analysis, [levels[index] for index in out_indices])
        classifier, single = None, False
    op_edits = plan_output_stride(analysis, request.output_stride)
    if op_edits:
        levels = tuple(
            dataclasses.replace(level, reduction=min(level.reduction, request.output_stride))
            if level.reduction is not None else level
            for level in levels
        )
    return ExtractionPlan(
        levels, out_indices, outputs, request.return_dict, source, single=single, classifier=classifier,
        op_edits=op_edits, output_stride=request.output_stride, output_fmt=request.output_fmt, isotropic=isotropic,
        replay=replay,
    )
