"""Check one zoo model the way ``make coverage`` does: fxfeat's levels against timm's, the eager model and
timm's dilated model.

For a timm model (random weights, the same for every method):

- ``auto``: ``fxfeat.compile(model, levels="auto")`` with the declared ``feature_info`` removed, compared with
  timm's ``features_only`` model carrying the same weights: *identical* when fxfeat returns timm's levels and
  nothing else, tensor for tensor (``torch.equal``, channels-last maps permuted); *contained* when every timm
  level is one of fxfeat's outputs.
- ``declared``: ``fxfeat.compile(model)`` honouring the declared levels, against the same timm tensors.
- ``output_stride``: ``fxfeat.compile(model, output_stride=8)`` against timm's ``features_only`` model built with
  ``output_stride=8``, where timm builds one whose last map really is at reduction 8.
- ``eager``: every ``auto`` output equals the eager model's tensor for that level.

A torchvision model has no declared levels: only ``auto`` and ``eager`` (at two input sizes) are checked.

Example:
    >>> from benchmarks.coverage_check import check_model
    >>> result = check_model("timm", "resnet10t", output_stride=False)
    >>> result["auto"]["identical"], result["declared"]["equal"], result["eager_equal"]
    (True, True, True)
"""

from __future__ import annotations

import copy
import time
import traceback
import warnings
from typing import Any

import torch
from torch import nn

import fxfeat
from benchmarks.references import as_list, eager_references, equal_maps, timm_feature_model
from fxfeat.models import build_model

__all__ = ["check_model", "compare_levels", "describe_error", "randomise_inert_weights"]

SECOND_SIZE_OFFSET = (64, 128)  # a non-square second input, as fxfeat's own second probe


def describe_error(error: BaseException) -> str:
    """``Type: first line of the message`` (an internal error also gets the innermost frame of fxfeat)."""
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
    if not isinstance(error, fxfeat.FxFeatError):
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "/fxfeat/" in f.filename]
        if frames:
            text += f" (at {frames[-1].filename.rsplit('/fxfeat/', 1)[1]}:{frames[-1].lineno})"
    return text[:300]


def compare_levels(references: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict[str, Any]:
    """Match timm's level tensors with fxfeat's outputs.

    Returns:
        ``identical`` (same count, equal in order), ``contained`` (each reference equals some output),
        ``found`` (for each reference, the index of the equal output or ``None``).
    """
    found = [next((j for j, output in enumerate(outputs) if equal_maps(reference, output)), None)
             for reference in references]
    identical = len(references) == len(outputs) and all(j == i for i, j in enumerate(found))
    return dict(identical=identical, contained=all(j is not None for j in found), found=found)


def _levels(info) -> list[dict[str, Any]]:
    return [dict(module=e["module"], node=e["node"], reduction=e["reduction"], channels=e["num_chs"],
                 native_fmt=e["native_fmt"]) for e in info.get_dicts()]


def _build(library: str, name: str, **kwargs) -> nn.Module:
    return randomise_inert_weights(build_model(f"{library}:{name}", **kwargs))


def randomise_inert_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give normalisation layers random statistics and affine parameters, and every all-zero weight small
    random values, in place.

    Random initialisation zeroes the last norm or projection of residual branches in many families (timm's
    zero-init-last, NFNet's skip gains), which makes a block's output equal its input: a level one block off
    would then pass as equal. Randomised, every block changes its input.
    """
    generator = torch.Generator().manual_seed(seed)

    def fill(tensor: torch.Tensor, low: float, high: float) -> None:
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    with torch.no_grad():
        for module in model.modules():
            for name, buffer in module.named_buffers(recurse=False):
                if name == "running_mean":
                    fill(buffer, -0.1, 0.1)
                elif name == "running_var":
                    fill(buffer, 0.5, 1.5)
        for parameter in model.parameters():
            if parameter.dim() >= 1 and parameter.is_floating_point() and not parameter.any():
                fill(parameter, -0.05, 0.05)
            elif parameter.dim() == 1 and parameter.is_floating_point() and bool((parameter == 1).all()):
                fill(parameter, 0.5, 1.5)
    return model


def _input_size(model: nn.Module) -> tuple[int, int, int]:
    return fxfeat.plan.make_request(model).input_size


def _compile(model: nn.Module, **kwargs):
    """The extractor returning *every* level (an isotropic model returns its last three by default, as timm's
    do) and the seconds the first compile took."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        extractor = fxfeat.compile(model, **kwargs)
        seconds = time.perf_counter() - start
        count = len(extractor.feature_info)
        if len(extractor.feature_info.out_indices) < count:
            extractor = fxfeat.compile(model, **kwargs, out_indices=tuple(range(count)))
    fallback = next((str(w.message) for w in caught if "train-mode graph" in str(w.message)), None)
    graphs = extractor.mode_graphs
    extractor.train_graph = (f"fallback: {fallback}" if fallback else
                             "same" if graphs["train"] is graphs["eval"] else "own")
    return extractor.eval(), seconds


def _run(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return as_list(module(x))


def _eager_equal(model: nn.Module, extractor, x: torch.Tensor) -> bool:
    outputs = _run(extractor, x)
    references = eager_references(model, extractor.feature_info, x)
    return len(outputs) == len(references) and all(equal_maps(r, o) for r, o in zip(references, outputs))


def _second_size(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """A non-square input of another size, if the model accepts one (windowed transformers may not)."""
    other = torch.randn(1, x.shape[1], *(s + o for s, o in zip(x.shape[2:], SECOND_SIZE_OFFSET)))
    try:
        with torch.no_grad():
            model(other)
    except Exception:
        return []
    return [other]


def _timm_reference(name: str, model: nn.Module, **kwargs) -> nn.Module:
    """timm's ``features_only`` model returning *every* declared level (its default may leave some out), or
    its default levels where timm cannot build that (TResNet declares a level `''` its wrapper cannot hook)."""
    indices = tuple(range(len(_declared(model) or ())))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm_feature_model(name, model, out_indices=indices, **kwargs)
        except Exception:
            return timm_feature_model(name, model, **kwargs)


def _declared(model: nn.Module) -> list[dict[str, Any]] | None:
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)
    if not isinstance(info, (list, tuple)) or not info:
        return None
    return [dict(module=e.get("module"), reduction=e.get("reduction"), channels=e.get("num_chs")) for e in info]


def _attempt(record: dict[str, Any], key: str, fn) -> Any:
    """Run ``fn``; on failure store the error under ``record[key]['error']`` and return ``None``."""
    try:
        return fn()
    except Exception as error:  # the coverage report records every failure, fxfeat's or the model's
        record.setdefault(key, {})["error"] = describe_error(error)
        return None


def check_model(library: str, name: str, *, output_stride: bool = True) -> dict[str, Any]:
    """Every coverage check of one model (see the module docstring). Failures are recorded, not raised."""
    from fxfeat.trace import evaluation_mode, trace_model

    model = _build(library, name)
    input_size = _input_size(model)
    torch.manual_seed(1)
    x = torch.randn(1, *input_size)
    result: dict[str, Any] = dict(
        library=library, name=name, input_size=list(input_size),
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
    )
    with evaluation_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = _attempt(result, "trace", lambda: trace_model(model))
    result["opaque"] = dict(traced.opaque_modules) if traced is not None else {}

    declared = _declared(model) if library == "timm" else None
    result["timm_levels"] = declared
    if declared is not None:
        reductions = [entry["reduction"] for entry in declared]
        result["cnn_style"] = all(a < b for a, b in zip(reductions, reductions[1:]))
    timm_features = None
    if library == "timm":
        reference = _attempt(result, "timm", lambda: _timm_reference(name, model))
        if reference is not None:
            timm_features = _attempt(result, "timm", lambda: _run(reference, x))

    auto_model = copy.copy(model)  # a shallow copy without the declared levels; the model keeps them
    auto_model.__dict__.pop("feature_info", None)
    compiled = _attempt(result, "auto", lambda: _compile(auto_model, levels="auto"))
    if compiled is not None:
        extractor, seconds = compiled
        auto = result.setdefault("auto", {})
        auto.update(levels=_levels(extractor.feature_info), compile_s=round(seconds, 4),
                    train_graph=extractor.train_graph)
        result["token_levels"] = any(level["native_fmt"] in ("NLC", "NCL") for level in auto["levels"])
        outputs = _attempt(result, "auto", lambda: _run(extractor, x))
        if outputs is not None and timm_features is not None:
            auto.update(compare_levels(timm_features, outputs))
        sizes = [x] if library == "timm" else [x, *_second_size(model, x)]
        result["eager_equal"] = _attempt(
            result, "eager", lambda: all(_eager_equal(model, extractor, size) for size in sizes))

    if library != "timm" or declared is None:
        return result
    compiled = _attempt(result, "declared", lambda: _compile(model))
    if compiled is not None:
        extractor, _ = compiled
        outputs = _attempt(result, "declared", lambda: _run(extractor, x))
        if outputs is not None and timm_features is not None:
            result["declared"] = dict(equal=compare_levels(timm_features, outputs)["identical"])
    if output_stride:
        result["output_stride"] = _check_output_stride(name, model, x)
    return result


def _check_output_stride(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """fxfeat's ``output_stride=8`` against timm's dilated ``features_only`` model, where timm has one."""
    record: dict[str, Any] = {}
    reference = _attempt(record, "timm", lambda: _timm_reference(name, model, output_stride=8))
    references = _attempt(record, "timm", lambda: _run(reference, x)) if reference is not None else None
    last = references[-1] if references else None
    if last is None or last.dim() != 4 or not _at_reduction(last, x, 8):
        return dict(supported=False, **record)
    compiled = _attempt(record, "fxfeat", lambda: _compile(model, output_stride=8))
    if compiled is None:
        return dict(supported=True, equal=False, **record)
    outputs = _attempt(record, "fxfeat", lambda: _run(compiled[0], x))
    equal = outputs is not None and compare_levels(references, outputs)["identical"]
    return dict(supported=True, equal=equal, **record)


def _at_reduction(feature: torch.Tensor, x: torch.Tensor, reduction: int) -> bool:
    """Whether a map (NCHW or NHWC) has the spatial size of ``x`` at ``reduction``."""
    expected = tuple(-(-size // reduction) for size in x.shape[-2:])
    sizes = {tuple(feature.shape[-2:]), tuple(feature.shape[1:3])}
    return any(all(abs(a - b) <= 1 for a, b in zip(size, expected)) for size in sizes)
