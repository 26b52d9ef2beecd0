"""Shapes, layouts and spatial reductions of every node, from probe runs of the traced graph.

The graph is run twice with ``torch.fx``'s ``ShapeProp``: at the probe size and at a second, non-square size.
A dimension that changes with the input size is spatial, one that does not is batch or channels. That tells
``NCHW`` from ``NHWC`` maps without reading any dimension blindly, and it tells a real feature map from a
fixed-size one (the 7x7 output of an adaptive pooling is not a feature map). Models that only accept their native
size fall back to one probe and a rule on equal dimensions.

Token sequences (``NLC``/``NCL``) take their grid from the data: the map they were flattened from, or the token
sequence (or the attention heads split from one) they were computed from, with the class, distillation or
register tokens in front counted as a *prefix*. Tokens whose grid cannot be traced to a map are not spatial.

The probes are :func:`fxfeat.trace.probe.run_probe`'s: on the ``meta`` device where the graph allows.

Example:
    >>> import torch, torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse.shapes import propagate_shapes
    >>> traced = trace_model(torchvision.models.resnet18().eval())
    >>> maps = propagate_shapes(traced.graph_module, (3, 224, 224))
    >>> maps["layer2_1_relu_1"]
    NodeShape(shape=(128, 28, 28), fmt='NCHW', reduction=8, grid=None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch.fx as fx

from fxfeat.errors import ShapePropagationError
from fxfeat.trace import describe_node
from fxfeat.trace.metadata import NO_TENSOR
from fxfeat.trace.probe import PROBE_BATCH, ProbeFailed, first_convolution_channels, run_probe

__all__ = ["NodeShape", "TokenGrid", "propagate_shapes", "second_probe_size", "reduction_of"]

_MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class TokenGrid:
    """Where the tokens of a sequence lie on a grid of the input.

    Attributes:
        prefix: tokens before the grid (class, distillation, register tokens); the grid is the rest.
        size: ``(h, w)`` of the grid at the probe size.
        source: the node whose value has the grid as two of its dimensions (the map the tokens were flattened
            from), so that the extractor reads ``h`` and ``w`` from it at run time.
        source_dims: the dimensions of ``source`` (batch included) that are ``h`` and ``w``.
    """

    prefix: int
    size: tuple[int, int]
    source: str
    source_dims: tuple[int, int] = (2, 3)


@dataclass(frozen=True)
class NodeShape:
    """Shape and layout of one tensor-valued node at the probe size.

    Attributes:
        shape: per-sample shape (batch dimension left out).
        fmt: ``"NCHW"``/``"NHWC"`` for feature maps, ``"NLC"``/``"NCL"`` for token sequences, ``None`` for
            everything else (vectors, fixed-size maps, 5-D tensors...).
        reduction: spatial reduction relative to the input, ``None`` if ``fmt`` is ``None``: a power of two, or
            the exact patch size where a grid divides the input by another number (14 for a ViT-L/14).
        grid: for token sequences, the grid they lie on.
    """

    shape: tuple[int, ...]
    fmt: str | None = None
    reduction: int | None = None
    grid: TokenGrid | None = None

    @property
    def is_map(self) -> bool:
        return self.fmt in ("NCHW", "NHWC")

    @property
    def is_spatial(self) -> bool:
        """A feature map or a token sequence on a grid of the input: what a level can be."""
        return self.fmt is not None and self.reduction is not None

    @property
    def channels(self) -> int | None:
        if self.fmt in ("NCHW", "NCL"):
            return self.shape[0]
        if self.fmt in ("NHWC", "NLC"):
            return self.shape[-1]
        return None


def reduction_of(size: int, input_size: int) -> int:
    """The largest power of two ``r`` with ``ceil(input_size / r) >= size``.

    Robust to "valid" convolutions, which lose a few pixels (Inception: 299 -> 149 is a reduction of 2).

    >>> reduction_of(149, 299), reduction_of(35, 299), reduction_of(8, 299), reduction_of(7, 224)
    (2, 8, 32, 32)
    """
    reduction = 1
    while math.ceil(input_size / (reduction * 2)) >= size and reduction < input_size:
        reduction *= 2
    return reduction


def second_probe_size(height: int, width: int) -> tuple[int, int]:
    """A second, non-square probe size that keeps the probe's divisibility by 32 and grows every map down to
    reduction 64 in both dimensions (and to 128 in width).

    >>> second_probe_size(224, 224)
    (288, 352)
    """
    return height + 64, width + 128


def _probe(graph_module, input_shape, what: str) -> dict[str, tuple[int, ...]]:
    try:
        return run_probe(graph_module, input_shape)
    except Exception as error:
        node = error.node if isinstance(error, ProbeFailed) else None
        cause = error.__cause__ if node is not None else error
        where = f" at {describe_node(node)}" if node else ""
        channels = first_convolution_channels(graph_module, node)
        channels = None if channels == input_shape[0] else channels
        hint = "pass input_size=(C, H, W) with a size the model accepts."
        if channels is not None:
            hint = (f"the model's first convolution ({node.target}) takes {channels} input channels: pass "
                    f"input_size=({channels}, {input_shape[1]}, {input_shape[2]}).")
        failure = ShapePropagationError(
            f"Running the traced model on a {what} probe input of shape {(PROBE_BATCH, *input_shape)} failed"
            f"{where}: {type(cause).__name__}: {cause}".strip(), hint=hint)
        failure.node, failure.cause, failure.input_channels = node, cause, channels
        raise failure from cause



def propagate_shapes(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> dict[str, NodeShape]:
    """Shape, layout and reduction of every tensor-valued node at ``input_size`` (C, H, W).

    Raises:
        ShapePropagationError: the model fails on a probe input of ``input_size``.
    """
    channels, height, width = input_size
    first = _probe(graph_module, (channels, height, width), "first")
    other_height, other_width = second_probe_size(height, width)
    try:
        second = run_probe(graph_module, (channels, other_height, other_width))
    except Exception:  # models with fixed-size position embeddings or windows accept one size only
        second = None
    sizes = ((height, width), (other_height, other_width)) if second is not None else ((height, width),)
    probes = [first] if second is None else [first, second]
    tracker = _GridTracker(graph_module.graph, sizes, one_probe=second is None)
    result = {}
    for node in graph_module.graph.nodes:
        shapes = tuple(probe.get(node.name) for probe in probes) if node.name in first else None
        shape = tracker.classify(node, shapes)
        if shape is not None:
            result[node.name] = shape
    return result


def _varying(shapes: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """The dimensions that differ between the probes (``None``: one probe only)."""
    if len(shapes) < 2:
        return None
    return tuple(i for i, (a, b) in enumerate(zip(*shapes)) if a != b)


def _grid_reduction(grids: list[tuple[int, int]], sizes) -> int | None:
    """Reduction of a grid measured at each probe size, if it is one: how much it widens when the input widens
    (blind to padding and "valid" convolutions), else its size (a power of two, or an exact integer division)."""
    (h, w), (height, width) = grids[0], sizes[0]
    if len(grids) > 1:
        growth = grids[1][1] - w
        return _snap((sizes[1][1] - width) / growth) if growth > 0 and grids[1][0] != h else None
    if not (1 < h <= height and 1 < w <= width):  # a 1x1 map is a global pooling's output, not a feature map
        return None
    power = reduction_of(h, height)
    if power != reduction_of(w, width):
        return None
    exact = height % h == 0 and width % w == 0 and height // h == width // w
    if exact and -(-height // power) != h:  # an exact grid of patches whose size is not a power of two (14)
        return height // h
    return power


def _snap(estimate: float) -> int:
    """A measured reduction: the nearest power of two when within 10% of it (absorbing the pixels "valid"
    convolutions lose), else the nearest integer (a patch size of 7 or 14)."""
    power = 2 ** round(math.log2(estimate))
    return max(1, int(power) if abs(estimate - power) <= 0.1 * power else round(estimate))


_MAP_DIMS = {"NCHW": (2, 3), "NHWC": (1, 2)}


def _map_shape(shapes, sizes) -> NodeShape:
    """A 4-D tensor: an ``NCHW`` or ``NHWC`` feature map if two of its dimensions follow the input's size. With
    one probe, where both layouts read as a grid (an ``NHWC`` map of 56x56x32 at 224: 56x32 passes as a grid of
    reduction 4 that "valid" convolutions shrank), the one nearer the input's size divided by its reduction wins
    (``NCHW`` on a tie)."""
    shape = shapes[0]
    varying = _varying(shapes)
    candidates = []
    for fmt, dims in _MAP_DIMS.items():
        if varying is not None and varying != dims:
            continue
        if varying is None and shape[0] != PROBE_BATCH:  # windows or heads folded into the batch: not a map
            continue
        reduction = _grid_reduction([(s[dims[0]], s[dims[1]]) for s in shapes], sizes)
        if reduction is not None:
            grid = (shape[dims[0]], shape[dims[1]])
            candidates.append((_distance(grid, sizes[0], reduction), fmt, reduction))
    if not candidates:
        return NodeShape(shape[1:])
    _, fmt, reduction = min(candidates, key=lambda candidate: candidate[0])  # min keeps the first of equals
    return NodeShape(shape[1:], fmt, reduction)


def _distance(grid: tuple[int, int], size: tuple[int, int], reduction: int) -> float:
    """How far a grid is from the input's ``size`` divided by ``reduction``, relative to it, summed over both
    dimensions: 0 for an exact grid.

    >>> _distance((56, 56), (224, 224), 4), _distance((56, 32), (224, 224), 4)
    (0.0, 0.42857142857142855)
    """
    return sum(abs(got - math.ceil(side / reduction)) / math.ceil(side / reduction) for got, side in zip(grid, size))


@dataclass(frozen=True)
class _Grid:
    """The grid of a map, or of a token sequence, at each probe (internal to the propagation)."""

    source: str  # the map the grid is read from at run time
    dims: tuple[int, int]  # the source's dimensions holding it
    sizes: tuple[tuple[int, int], ...]  # (h, w) at each probe
    reduction: int
    prefix: int
    order: int  # position of the node carrying it, in graph order

    @property
    def count(self) -> int:
        """Tokens (grid and prefix) at the first probe."""
        (height, width) = self.sizes[0]
        return height * width + self.prefix


class _GridTracker:
    """Follows grids through the graph in order: the maps (and their grids), the token sequences with theirs, and
    the tensors that keep a token count whole (attention heads split off the tokens: not maps, whatever their
    shape). Only values computed from the input count (a position table or bias is no map, whatever its shape)."""

    def __init__(self, graph: fx.Graph, sizes, one_probe: bool):
        self.sizes, self.one_probe = sizes, one_probe
        self.grids: dict[str, _Grid] = {}  # maps and token sequences
        self.carriers: dict[str, _Grid] = {}  # token sequences and the tensors keeping their count whole
        image = next((node.name for node in graph.nodes if node.op == "placeholder"), None)
        self.from_image = {image}
        self.order = 0

    def classify(self, node: fx.Node, shapes: tuple[tuple[int, ...] | None, ...] | None) -> NodeShape | None:
        """The shape of ``node`` from its shapes at each probe (``None``: its value is no tensor), after recording
        what it inherits from its inputs."""
        self.order += 1
        if any(arg.name in self.from_image for arg in node.all_input_nodes):
            self.from_image.add(node.name)
        carried = [self.carriers[arg.name] for arg in node.all_input_nodes if arg.name in self.carriers]
        if shapes is None:  # a tuple of tensors (unbind, chunk) passes a token count on; a size does not
            if carried and not node.meta.get(NO_TENSOR):
                self.carriers[node.name] = max(carried, key=lambda grid: grid.order)
            return None
        shape = NodeShape(shapes[0][1:])
        kept = [grid for grid in carried if grid.count in shape.shape]
        if kept:
            self.carriers[node.name] = max(kept, key=lambda grid: grid.order)
        if node.name not in self.from_image or None in shapes or any(len(s) != len(shapes[0]) for s in shapes):
            return shape
        if len(shapes[0]) == 4 and not (self.one_probe and node.name in self.carriers):
            shape = _map_shape(shapes, self.sizes)
            if shape.is_map:
                dims = _MAP_DIMS[shape.fmt]
                grids = tuple((s[dims[0]], s[dims[1]]) for s in shapes)
                self.grids[node.name] = _Grid(node.name, dims, grids, shape.reduction, 0, self.order)
        elif len(shapes[0]) == 3:
            inputs = [self.grids.get(arg.name) or self.carriers.get(arg.name) for arg in node.all_input_nodes]
            shape, grid = _token_shape(shapes, self.sizes, [grid for grid in inputs if grid is not None], self.order)
            if grid is not None:
                self.grids[node.name] = self.carriers[node.name] = grid
        return shape


def _token_shape(shapes, sizes, inputs: list[_Grid], order: int) -> tuple[NodeShape, _Grid | None]:
    """A 3-D tensor: an ``NLC`` or ``NCL`` token sequence if one of its dimensions is a grid plus a fixed number
    of prefix tokens. The grid comes from an input: a map the tokens are flattened from, or a token sequence
    with the same grid (a block's residual path, a class token concatenated or sliced off), or a tensor that
    split the channels of such tokens (an attention's heads). The fewest prefix tokens win, then the latest.
    Tokens with no such input are not a grid: their order is unknown (Hiera unrolls its map into tokens that are
    not in raster order; NaFlexViT patchifies by reshaping), so returning them as a map could be wrong."""
    shape = shapes[0]
    varying = _varying(shapes)
    if varying is None and shape[0] != PROBE_BATCH:  # windows or heads folded into the batch
        return NodeShape(shape[1:]), None
    dims = [dim for dim in (1, 2) if varying is None or varying == (dim,)]
    best = None
    for dim in dims:
        lengths = [s[dim] for s in shapes]
        for grid in inputs:
            prefixes = {length - h * w for length, (h, w) in zip(lengths, grid.sizes)}
            prefix = prefixes.pop()
            if prefixes or not 0 <= prefix <= _MAX_PREFIX_TOKENS:
                continue
            rank = (prefix, -grid.order, dim)
            if best is None or rank < best[0]:
                best = (rank, dim, grid, prefix)
    if best is not None:
        _, dim, grid, prefix = best
        token_grid = TokenGrid(prefix, grid.sizes[0], grid.source, grid.dims)
        return (NodeShape(shape[1:], _TOKEN_FORMATS[dim], grid.reduction, token_grid),
                replace(grid, prefix=prefix, order=order))
    return NodeShape(shape[1:]), None


_TOKEN_FORMATS = {1: "NLC", 2: "NCL"}
