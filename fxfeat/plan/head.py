"""The head's features as levels: ``unpooled``, ``pooled`` and ``embedding`` (``logits`` is another name for it),
for ``mode=...`` and as names in ``levels=[...]``.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> analysis = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224))
    >>> [(head_level(analysis, name)[0].node, head_level(analysis, name)[0].shape) for name in HEAD_FEATURES]
    [('layer4_1_relu_1', (512, 7, 7)), ('flatten', (512,)), ('fc', (1000,)), ('fc', (1000,))]
"""

from __future__ import annotations

import dataclasses

from fxfeat.analyse import GraphAnalysis, Level
from fxfeat.analyse.final_maps import ReplayStep, is_vector
from fxfeat.errors import HeadNotFoundError

__all__ = ["HEAD_FEATURES", "head_level"]

HEAD_FEATURES = ("unpooled", "pooled", "embedding", "logits")
_HINT = "use mode='features' for the feature pyramid, or pick nodes with levels=[...] (see fxfeat.inspect)."


def head_level(analysis: GraphAnalysis, feature: str) -> tuple[Level, tuple[ReplayStep, ...]]:
    """The level ``feature`` (one of :data:`HEAD_FEATURES`) stands for, keyed by that name, and the operations
    the rewrite replays to compute it (``pooled`` after two averaged heads, or a flatten after a 1x1 classifier).

    Raises:
        HeadNotFoundError: the model has no such feature (no global pooling; no vector per image).
    """
    head, name = analysis.head, analysis.traced.model_name
    if feature == "unpooled":
        if head.unpooled is None:
            raise HeadNotFoundError(
                f"{name} has no global pooling: no node after its last feature map removes the spatial "
                "dimensions (the model may return maps itself).",
                hint=_HINT,
            )
        return dataclasses.replace(analysis.level_at(head.unpooled), key=feature), ()
    if feature in ("embedding", "logits"):
        return _keyed(_vector(analysis, head.final.output, feature), feature), ()
    final = head.final
    if final.pooled is None or not final.replay:
        return _keyed(_vector(analysis, final.pooled, feature), feature), ()
    level = Level(node=final.pooled, module="", reduction=None, channels=final.shape[0] if final.shape else None,
                  fmt=None, shape=final.shape, module_output=False)  # computed by the replay, no module returns it
    return _keyed(_checked_vector(analysis, level, feature), feature), final.replay


def _keyed(level: Level, feature: str) -> Level:
    return dataclasses.replace(level, key=feature)


def _vector(analysis: GraphAnalysis, node: str | None, feature: str) -> Level:
    if node is None:
        raise HeadNotFoundError(
            f"{analysis.traced.model_name} returns no tensor fxfeat can read, so it has no {feature!r} features.",
            hint=_HINT,
        )
    return _checked_vector(analysis, analysis.level_at(node), feature)


def _checked_vector(analysis: GraphAnalysis, level: Level, feature: str) -> Level:
    """``level`` if it is one vector per image, else a :class:`HeadNotFoundError` naming what it is."""
    if level.fmt is None and is_vector(level.shape):
        return level
    name, head = analysis.traced.model_name, analysis.head
    if feature == "pooled" and head.classifier is not None and level.fmt is not None:
        what = (f"applies its final linear map ({head.classifier}) to a spatial {level.fmt} tensor (node "
                f"{level.node!r}), before any global pooling, so it has no pooled vector")
    else:
        kind = f"{level.fmt} " if level.fmt else ""
        what = (f"returns a {kind}tensor of shape {'x'.join(map(str, level.shape)) or '()'} per image (node "
                f"{level.node!r}), not one vector per image, so it has no {feature!r} features")
    raise HeadNotFoundError(
        f"{name} {what}.",
        hint=("use mode='unpooled' for the last feature map, or " if head.unpooled else "use ") + _HINT[4:],
    )
