"""One model's catalog entry: what ``fxfeat.compile(model)`` returns by default (its levels' modules,
reductions and channels), the head features' shapes, the parameter count, or why it does not compile.

The model is built on the ``meta`` device where it allows it (no weights allocated, so a billion-parameter model
compiles as fast as a small one: shapes are all fxfeat reads); a model that fails there is built again on the CPU
and the entry says why (``meta_error``).

Example:
    >>> entry = catalog_entry("torchvision", "resnet18")
    >>> entry["params"], entry["device"], entry["source"]
    (11689512, 'meta', 'discovered')
    >>> [(level["module"], level["reduction"], level["channels"]) for level in entry["levels"]][:2]
    [('relu', 2, 64), ('layer1', 4, 64)]
    >>> entry["unpooled"], entry["pooled"], entry["embedding"]
    ([512, 7, 7], [512], [1000])
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from fxfeat.api import compile, compile_inspected
from fxfeat.errors import FxFeatError
from fxfeat.models import build_model

__all__ = ["CATALOG_LIBRARIES", "HEAD_KEYS", "catalog_entry", "describe_error"]

CATALOG_LIBRARIES = ("timm", "torchvision")
HEAD_KEYS = ("unpooled", "pooled", "embedding")


def catalog_entry(library: str, name: str, device: str = "meta") -> dict[str, Any]:
    """The catalog entry of ``library:name`` (random weights), compiled on ``device`` (``"meta"`` falls back to
    the CPU when the model fails there); failures are recorded in ``error``, not raised."""
    start = time.perf_counter()
    entry: dict[str, Any] = dict(name=name, library=library, params=None, levels=None, source=None, token=None,
                                 input_size=None, **dict.fromkeys(HEAD_KEYS), exports=None, error=None,
                                 device=device)
    try:
        entry.update(_compiled(library, name, device))
    except Exception as error:  # every failure is the entry's answer, not the build's
        if device != "meta":
            entry["error"] = describe_error(error)
        else:
            cpu = catalog_entry(library, name, device="cpu")
            entry.update(cpu, meta_error=describe_error(error))
    entry["seconds"] = round(time.perf_counter() - start, 2)
    return entry


def _compiled(library: str, name: str, device: str) -> dict[str, Any]:
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(f"{library}:{name}")
        params = sum(parameter.numel() for parameter in model.parameters())
        reports = []

        def default_levels_and_heads(report):
            reports.append(report)
            heads = [key for key in HEAD_KEYS if getattr(report.head, key) is not None]
            return [report.levels[index].node for index in report.out_indices] + heads

        try:
            _, extractor = compile_inspected(model, default_levels_and_heads)
            head_error = None
        except FxFeatError as error:  # the head features do not compile: the pyramid alone, as compile() does
            if not reports:
                raise
            extractor, head_error = compile(model), describe_error(error)
    report = reports[0]
    infos = extractor.feature_info.get_dicts()
    heads = {info["head"]: info["shape"] for info in infos if info.get("head")}
    levels = [report.levels[index] for index in report.out_indices]
    entry = dict(
        params=params, source=report.source, input_size=list(report.input_size),
        levels=[dict(module=level.module, reduction=level.reduction, channels=level.channels)
                for level in levels],
        token=any(info.get("native_fmt") == "NLC" for info in infos[:len(levels)]),
        **{key: None if heads.get(key) is None else list(heads[key]) for key in HEAD_KEYS},
    )
    if head_error:
        entry["head_error"] = head_error
    return entry


def describe_error(error: BaseException) -> str:
    """An error in one line: its type and the first line of its message, at most 300 characters."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"
