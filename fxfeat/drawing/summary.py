"""What a picture of the levels shows, gathered from ``feature_info`` and ``fxfeat.inspect``'s report: every
number a picture draws is a field of :class:`Summary`, and every field comes from one of those two.

Example:
    >>> import torchvision
    >>> summary, extractor = summarise_model(torchvision.models.resnet18(), out_indices=(3, 4))
    >>> [(level.module, level.reduction, level.returned) for level in summary.levels][2:]
    [('layer2', 8, False), ('layer3', 16, True), ('layer4', 32, True)]
    >>> [(step.kind, step.shape) for step in summary.head]
    [('unpooled', (512, 7, 7)), ('pooled', (512,)), ('embedding', (1000,))]
    >>> summary.global_pool, summary.linear, extractor.feature_info.out_indices
    ('avgpool', ('fc',), (3, 4))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fxfeat.api import Inspection, compile, compile_inspected
from fxfeat.feature_info import FeatureInfo
from fxfeat.module import FeatureGraphModule

__all__ = ["HeadStep", "Level", "Summary", "spatial_size", "summarise_extractor", "summarise_model"]

# The head features in the order the model computes them.
HEAD_KINDS = ("unpooled", "pooled", "embedding", "logits")


@dataclass(frozen=True)
class Level:
    """One level: its ``feature_info`` entry's fields, and what the inspect report says of it.

    Attributes:
        index, module, node, reduction, channels, shape, fmt: the ``feature_info`` entry's (``shape`` per sample
            at the probe size, ``None`` where ``feature_info`` has none).
        prefix_tokens: the entry's ``num_prefix_tokens`` (class and register tokens of a token sequence).
        returned: whether the extractor returns it (``index in feature_info.out_indices``).
        parameters: parameters needed to compute it (the report's; ``None`` without a report).
        candidates: the other nodes the level was chosen over (the report's).
    """

    index: int
    module: str
    node: str
    reduction: int | None
    channels: int | None
    shape: tuple[int, ...] | None
    fmt: str
    returned: bool
    prefix_tokens: int = 0
    parameters: int | None = None
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeadStep:
    """A head feature (``unpooled``, ``pooled``, ``embedding``/``logits``) from its ``feature_info`` entry."""

    kind: str
    module: str
    node: str
    shape: tuple[int, ...] | None
    fmt: str
    reduction: int | None


@dataclass(frozen=True)
class Summary:
    """The numbers of a picture of the levels.

    Attributes:
        model_name: the model's class name (the extractor's, for an extractor).
        input_size: the probe size ``(C, H, W)`` the shapes are at (``None``: unknown).
        levels: every level, returned or not.
        out_indices: the levels the extractor returns.
        output_stride: the ``output_stride`` asked for (``None``: native).
        head: the head features found, in the order the model computes them.
        global_pool: the node that pools ``unpooled`` (the report's; ``None``: unknown or none).
        linear: the final linear maps between ``pooled`` and the model's vector, first to last (the report's).
        source: where the levels come from (the report's ``"declared"``, ``"discovered"``, ``"user"``), or
            ``"feature_info"`` for an extractor.
        total_parameters: parameters of the whole model (the report's; ``None`` for an extractor).
    """

    model_name: str
    input_size: tuple[int, int, int] | None
    levels: tuple[Level, ...]
    out_indices: tuple[int, ...]
    output_stride: int | None
    head: tuple[HeadStep, ...]
    global_pool: str | None
    linear: tuple[str, ...]
    source: str
    total_parameters: int | None


def spatial_size(shape: tuple[int, ...] | None, fmt: str) -> tuple[int, int] | None:
    """``(H, W)`` of a per-sample ``shape`` in layout ``fmt`` (``None`` for vectors, token sequences and unknown
    shapes).

    Example:
        >>> spatial_size((256, 14, 14), "NCHW"), spatial_size((7, 9, 768), "NHWC"), spatial_size((197, 768), "NLC")
        ((14, 14), (7, 9), None)
    """
    if shape is None or len(shape) != 3:
        return None
    return (shape[0], shape[1]) if fmt == "NHWC" else (shape[1], shape[2])


def _head_steps(info: FeatureInfo) -> tuple[HeadStep, ...]:
    entries = {entry["head"]: entry for entry in info.info if entry.get("head")}
    return tuple(HeadStep(kind, entries[kind]["module"], entries[kind]["node"], entries[kind].get("shape"),
                          entries[kind].get("fmt", ""), entries[kind].get("reduction"))
                 for kind in HEAD_KINDS if kind in entries)


def _levels(info: FeatureInfo, report: Inspection | None) -> tuple[Level, ...]:
    rows = {row.node: row for row in report.levels} if report is not None else {}
    levels = []
    for entry in info.info:
        if entry.get("head"):
            continue
        row = rows.get(entry["node"])
        levels.append(Level(
            index=entry["index"], module=entry["module"], node=entry["node"], reduction=entry["reduction"],
            channels=entry["num_chs"], shape=entry.get("shape"), fmt=entry.get("fmt", "NCHW"),
            returned=entry["index"] in info.out_indices, prefix_tokens=entry.get("num_prefix_tokens", 0),
            parameters=row.parameters if row else None,
            candidates=tuple(node for node in row.candidates if node != row.node) if row else (),
        ))
    return tuple(levels)


def summarise_model(model: nn.Module, *, levels=None, input_size=None, out_indices=None, output_stride=None,
                    ) -> tuple[Summary, FeatureGraphModule]:
    """The summary of ``model`` and the extractor ``fxfeat.compile`` makes of it with these arguments: the
    levels from that extractor's ``feature_info``, their parameters and candidates, the head's nodes and the
    model's size from ``fxfeat.inspect``'s report, the head's shapes from the ``feature_info`` of an extractor of
    the head features (compiled from the report's trace). ``model`` is not modified."""
    def head_features(report: Inspection) -> list[str]:
        found = [kind for kind in HEAD_KINDS[:3] if getattr(report.head, kind) is not None]
        return found or [report.levels[-1].node]  # compile_inspected compiles something; only heads are read

    report, heads = compile_inspected(model, head_features, levels=levels, input_size=input_size,
                                      out_indices=out_indices, output_stride=output_stride)
    extractor = compile(model, levels=levels, input_size=report.input_size, out_indices=out_indices,
                        output_stride=output_stride)
    summary = Summary(
        model_name=report.model_name, input_size=report.input_size, levels=_levels(extractor.feature_info, report),
        out_indices=extractor.feature_info.out_indices, output_stride=output_stride,
        head=_head_steps(heads.feature_info), global_pool=report.head.global_pool,
        linear=tuple(reversed(report.head.final.linear)), source=report.source,
        total_parameters=report.total_parameters,
    )
    return summary, extractor


def summarise_extractor(extractor: FeatureGraphModule) -> Summary:
    """The summary of a compiled extractor, from its ``feature_info`` alone (an extractor keeps no inspect
    report: no parameters, candidates, pooling or final linear maps)."""
    info = extractor.feature_info
    return Summary(
        model_name=type(extractor).__name__, input_size=extractor.input_size, levels=_levels(info, None),
        out_indices=info.out_indices, output_stride=None, head=_head_steps(info), global_pool=None, linear=(),
        source="feature_info", total_parameters=None,
    )
