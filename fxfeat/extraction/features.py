"""Which tensors ``fxfeat.extract`` writes, and the one extractor that computes all of them in one forward pass.

A feature request is ``"pooled"`` (the vector before the final linear maps, ``mode="pooled"``), ``"embedding"`` or
``"logits"`` (the model's own final vector, ``mode="embedding"``), ``"unpooled"`` (the last map before the global
pool, ``mode="unpooled"``), ``"features"`` (the pyramid levels ``out_indices`` selects), a level index, or a level
name (a module path, a level's output name, or an fx node name), or a list of these. Each becomes a
:class:`FeatureSpec`, whose folder is named by the rule of ``return_dict`` keys (:mod:`fxfeat.plan.names`); they are
compiled into one extractor with ``levels=[...]`` (the head features by their names), so one forward pass gives
every feature, from the one trace that also lists the levels the requests name (``fxfeat.api.compile_inspected``).
``pool="avg"``/``"max"`` turns maps into vectors.

Example:
    >>> import torchvision
    >>> model = torchvision.models.resnet18()
    >>> extractor, specs = build_extractor(model, ["pooled", "features", "logits"], out_indices=(3, 4))
    >>> [(spec.name, spec.output) for spec in specs]
    [('pooled', 0), ('layer3', 1), ('layer4', 2), ('logits', 3)]
    >>> [tuple(t.shape) for t in extractor.eval()(torch.randn(1, 3, 64, 64))]
    [(1, 512), (1, 256, 4, 4), (1, 512, 2, 2), (1, 1000)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxfeat.api import Inspection, compile_inspected
from fxfeat.errors import InvalidRequestError, OutIndicesError
from fxfeat.extraction.format import feature_names
from fxfeat.module import FeatureGraphModule
from fxfeat.plan.head import HEAD_FEATURES
from fxfeat.plan.names import entry_label, output_names
from fxfeat.trace.metadata import output_node

__all__ = ["KEYWORDS", "POOLS", "FeatureSpec", "build_extractor", "extractor_features"]

KEYWORDS = (*HEAD_FEATURES, "features")
POOLS = ("avg", "max", None)


@dataclass(frozen=True)
class FeatureSpec:
    """One written feature.

    Attributes:
        name: its folder in the output.
        output: index of the extractor output it is computed from.
        pool: ``"avg"``/``"max"`` over the spatial dimensions of a map, or ``None`` (as computed).
        info: the extractor's ``feature_info`` entry of that output (channels, reduction, module, node, shape).
    """

    name: str
    output: int
    pool: str | None
    info: dict[str, Any]

    def apply(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """This feature from the extractor's outputs (one batch)."""
        tensor = outputs[self.output]
        if self.pool == "avg":
            return tensor.mean(dim=(2, 3))
        if self.pool == "max":
            return tensor.amax(dim=(2, 3))
        return tensor

    def shape(self) -> tuple[int, ...]:
        """Per-image shape of the written rows at the compiled size."""
        shape = tuple(self.info["shape"])
        return shape[:1] if self.pool else shape


def build_extractor(
    model: nn.Module,
    features: str | int | Sequence[str | int] = "pooled",
    *,
    pool: str | dict[str, str | None] | None = None,
    out_indices: int | tuple[int, ...] | None = None,
    levels: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    output_stride: int | None = None,
) -> tuple[FeatureGraphModule, list[FeatureSpec]]:
    """One extractor computing every requested feature, and the specs that read them from its outputs.

    Raises:
        InvalidRequestError: an unknown keyword, a repeated feature, a bad ``pool``.
        OutIndicesError: a level index that does not exist.
        HeadNotFoundError: ``"unpooled"`` of a model without a global pool, ``"pooled"``/``"embedding"`` of one that
            returns no vector per image.
    """
    requests = _as_list(features)
    report, extractor = compile_inspected(
        model, lambda report: list(dict.fromkeys(level for _, level in _named(report, requests))), levels=levels,
        input_size=input_size, out_indices=out_indices if "features" in requests else None,
        output_stride=output_stride)
    named = _named(report, requests)
    compiled_levels = list(dict.fromkeys(level for _, level in named))
    entries = extractor.feature_info.get_dicts()
    pools = _pools(pool, [name for name, _ in named])
    folders = feature_names([name for name, _ in named], fallbacks=[level for _, level in named])
    specs = []
    for (name, level), folder in zip(named, folders):
        index = compiled_levels.index(level)
        entry = dict(entries[index])
        chosen = pools.get(name)
        if chosen is not None and entry["reduction"] is None:
            chosen = None if name not in _explicit(pool) else _vector_pool_error(name, chosen)
        specs.append(FeatureSpec(folder, index, chosen, entry))
    return extractor, specs


def _named(report: Inspection, requests: list[str | int]) -> list[tuple[str, str]]:
    """``(feature name, level to compile)`` of every requested feature, each named once."""
    named: list[tuple[str, str]] = []
    for request in requests:
        named.extend(_expand(report, request))
    names = [name for name, _ in named]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidRequestError(f"features names {', '.join(repeated)} more than once.",
                                  hint="list each feature once ('features' already holds the pyramid levels).")
    return named


def extractor_features(extractor: FeatureGraphModule, pool: Any = None) -> list[FeatureSpec]:
    """The specs of an extractor ``fxfeat.compile`` already built: each of its outputs, named by its level
    (``"pooled"``, ``"embedding"``... for the head features)."""
    entries = extractor.feature_info.get_dicts()
    labels = [entry_label(entry) for entry in entries]
    if extractor.feature_info.out_indices and len(entries) == 1 and _returns_tensor(extractor) and not \
            entries[0].get("head"):  # a new classifier's logits, or an extractor saved before entries named heads
        labels = ["pooled" if entries[0]["reduction"] is None else "unpooled"]
    pools = _pools(pool, labels)
    folders = feature_names(labels, fallbacks=[entry["node"] for entry in entries])
    return [FeatureSpec(folder, index, pools.get(label) if entry["reduction"] is not None else None, dict(entry))
            for index, (label, folder, entry) in enumerate(zip(labels, folders, entries))]


def _returns_tensor(extractor: FeatureGraphModule) -> bool:
    output = output_node(extractor.graph)
    return not isinstance(output.args[0], (list, tuple, dict))


def _as_list(features: Any) -> list[str | int]:
    items = [features] if isinstance(features, (str, int)) else list(features) if isinstance(
        features, Sequence) else None
    if not items or not all(isinstance(item, (str, int)) and not isinstance(item, bool) for item in items):
        raise InvalidRequestError(
            f"features must be 'pooled', 'unpooled', 'features', a level index or name, or a list of them; got "
            f"{features!r}.", hint="e.g. features=['pooled', 'features'] or features=['layer3', -1].")
    return items


def _expand(report: Inspection, request: str | int) -> list[tuple[str, str]]:
    """``(name, level to compile)`` for one entry of ``features``."""
    if request in HEAD_FEATURES:
        return [(request, request)]  # compile resolves the name, or says why the model has no such feature
    levels = report.levels
    if request == "features":
        names = output_names([level.module or level.node for level in levels], [level.node for level in levels])
        return [(names[index], levels[index].node) for index in report.out_indices]
    if isinstance(request, int):
        if not -len(levels) <= request < len(levels):
            raise OutIndicesError(f"features asks for level {request}, but {report.model_name} has {len(levels)} "
                                  f"levels (0 to {len(levels) - 1}).", hint="see fxfeat.inspect(model).")
        level = levels[request]
        return [(level.module or level.node, level.node)]
    for level in levels:
        if request in (level.module, level.node, (level.module or "").replace(".", "_")):
            return [(request, level.node)]
    return [(request, request)]  # any module path or node name: compile resolves it, or says why not


def _explicit(pool: Any) -> dict[str, Any]:
    return pool if isinstance(pool, dict) else {}


def _pools(pool: Any, names: list[str]) -> dict[str, str | None]:
    if isinstance(pool, dict):
        unknown = sorted(set(pool) - set(names))
        if unknown:
            raise InvalidRequestError(f"pool names features that are not extracted: {', '.join(unknown)}.",
                                      hint=f"the features are {', '.join(names)}.")
        choices = pool
    else:
        choices = dict.fromkeys(names, pool)
    for name, choice in choices.items():
        if choice not in POOLS:
            raise InvalidRequestError(f"pool={choice!r} for {name!r}: pool is 'avg', 'max' or None.",
                                      hint="pool='avg' averages each map over its height and width.")
    return dict(choices)


def _vector_pool_error(name: str, pool: str) -> None:
    raise InvalidRequestError(f"pool={pool!r} for {name!r}, which is already a vector.",
                              hint="pool applies to feature maps; leave it out for this feature.")
