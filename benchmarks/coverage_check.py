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

Then the head features (docs/heads.md), each against the library's own reference, ``torch.equal`` (fp32, eval):

- timm, the model with its classifier (``heads["head"]``): ``pooled`` against
  ``forward_head(forward_features(x), pre_logits=True)``, ``embedding`` against ``model(x)`` and ``unpooled``
  (``output_fmt="native"``) against ``forward_features(x)``; the same model built headless, ``num_classes=0``,
  carrying the same weights (``heads["headless"]``): ``pooled`` and ``embedding`` against its own
  ``forward_head(..., pre_logits=True)`` and ``model(x)``. The headless model is timm's own
  (``create_model(name, num_classes=0)``), not ``reset_classifier(0)`` on a copy: the two build the same modules
  except RepViT's, whose ``reset_classifier`` drops the distillation head that ``num_classes=0`` keeps as an
  identity.
- torchvision (``heads["head"]``): ``pooled`` against the model with its last ``nn.Linear`` (registration order)
  replaced by ``nn.Identity`` (the model itself where it has none, SqueezeNet), ``embedding`` against ``model(x)``;
  that ``nn.Identity``-head model (``heads["identity_head"]``): both against its ``model(x)``.

The features of one model come from one extractor (``levels=["unpooled", "pooled", "embedding"]``, which places
each by the same rule as ``mode=``), or, where that one fails, from one ``mode=`` extractor each. Each feature
records ``equal`` with the shapes (and the largest difference where they agree), or the ``error``.

Example:
    >>> from benchmarks.coverage_check import check_model
    >>> result = check_model("timm", "resnet10t", output_stride=False)
    >>> result["auto"]["identical"], result["declared"]["equal"], result["eager_equal"]
    (True, True, True)
    >>> result["heads"]["head"]["pooled"]["equal"], result["heads"]["headless"]["embedding"]["equal"]
    (True, True)
"""

from __future__ import annotations

import copy
import functools
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxfeat
from benchmarks.references import (
    as_list,
    eager_references,
    equal_maps,
    timm_feature_model,
    without_final_linear,
)
from fxfeat.models import build_model

__all__ = ["check_model", "compare_feature", "compare_levels", "describe_error", "head_features",
           "head_miss", "randomise_inert_weights"]

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


def check_model(library: str, name: str, *, output_stride: bool = True, heads: bool = True,
                on_levels_checked: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every coverage check of one model (see the module docstring). Failures are recorded, not raised.

    Args:
        output_stride: check ``output_stride=8`` against timm's dilated model.
        heads: check the head features.
        on_levels_checked: called with the result so far before the head checks begin (the coverage worker sends
            it, so that a model past the time limit in its head checks keeps its level results).
    """
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
    if library == "timm":  # timm's features_only model (a copy of the weights) is dropped once it has run
        timm_features = _attempt(result, "timm", lambda: _run(_timm_reference(name, model), x))

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

    if library == "timm" and declared is not None:
        compiled = _attempt(result, "declared", lambda: _compile(model))
        if compiled is not None:
            extractor, _ = compiled
            outputs = _attempt(result, "declared", lambda: _run(extractor, x))
            if outputs is not None and timm_features is not None:
                result["declared"] = dict(equal=compare_levels(timm_features, outputs)["identical"])
        if output_stride:
            result["output_stride"] = _check_output_stride(name, model, x)
    if heads:
        if on_levels_checked is not None:
            on_levels_checked(result)
        start = time.perf_counter()
        check_heads = _check_timm_heads if library == "timm" else _check_torchvision_heads
        checked = _attempt(result, "heads", lambda: check_heads(name, model, x))
        if checked is not None:
            result["heads"] = checked
        result["heads"]["seconds"] = round(time.perf_counter() - start, 2)
    return result


def head_features(model: nn.Module, x: torch.Tensor, features: tuple[str, ...],
                  input_size: tuple[int, int, int] | None = None, together: bool = True) -> dict[str, Any]:
    """fxfeat's head ``features`` of ``model`` for ``x`` (``output_fmt="native"``), each a tensor or the exception
    that compiling or running it raised: from one extractor returning them all, or, where that one fails (or
    ``together`` is false: a model expected to have none of them), from one ``mode=`` extractor each."""

    def run(**kwargs) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            extractor = fxfeat.compile(model, output_fmt="native", input_size=input_size, **kwargs).eval()
            return _run(extractor, x)

    if together:
        try:
            return dict(zip(features, run(levels=list(features)), strict=True))
        except Exception as error:  # recorded per feature below
            if len(features) == 1:
                return {features[0]: error}
    values: dict[str, Any] = {}
    for feature in features:
        try:
            values[feature] = run(mode=feature)[0]
        except Exception as error:
            values[feature] = error
    return values


def compare_feature(output: torch.Tensor | BaseException, reference: Callable[[], Any]) -> dict[str, Any]:
    """fxfeat's ``output`` (or the error it raised) against ``reference()``, the library's tensor: ``equal``
    (``torch.equal``) with both shapes, and the largest difference where the shapes agree; or ``error`` (fxfeat's)
    or ``reference_error`` (the library's)."""
    if isinstance(output, BaseException):
        return dict(error=describe_error(output))
    record: dict[str, Any] = dict(shape=list(output.shape))
    try:
        with torch.no_grad():
            expected = reference()
        if not isinstance(expected, torch.Tensor):
            raise TypeError(f"the reference is a {type(expected).__name__}, not one tensor")
    except Exception as error:  # the library's own forward failing is recorded, as fxfeat's errors are
        return dict(record, reference_error=describe_error(error))
    record["equal"] = output.shape == expected.shape and torch.equal(output, expected)
    if not record["equal"]:
        record["reference_shape"] = list(expected.shape)
        if output.shape == expected.shape:
            record["max_abs_diff"] = float((output - expected).abs().max())
    return record


def head_miss(record: dict[str, Any]) -> str:
    """Why one head feature's record is not ``equal``, in a few words (empty when it is)."""
    if record.get("equal"):
        return ""
    if "error" in record:
        return record["error"]
    if "reference_error" in record:
        return f"no reference: {record['reference_error']}"
    if "max_abs_diff" in record:
        return f"values differ (largest difference {record['max_abs_diff']:.3g}), shape {record['shape']}"
    if "reference_shape" in record:
        return f"shape {record['shape']}, the reference's {record['reference_shape']}"
    return record.get("expected", "not measured")


def _compared(outputs: dict[str, Any], references: dict[str, Callable[[], Any]]) -> dict[str, dict[str, Any]]:
    return {feature: compare_feature(outputs[feature], references[feature]) for feature in references}


def _cloned(features: Any) -> Any:
    """A copy of ``forward_features``' result (a tensor, or a list of them: CoaT's, CrossViT's), which
    ``forward_head`` may change in place."""
    return [tensor.clone() for tensor in features] if isinstance(features, (list, tuple)) else features.clone()


def _check_timm_heads(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """timm's head features, with the classifier and headless (see the module docstring)."""
    def timm_references(module: nn.Module) -> dict[str, Callable[[], Any]]:
        forward_features = functools.cache(lambda: module.forward_features(x))
        return dict(unpooled=forward_features,
                    pooled=lambda: module.forward_head(_cloned(forward_features()), pre_logits=True),
                    embedding=lambda: module(x))

    with_head = _compared(head_features(model, x, ("unpooled", "pooled", "embedding")), timm_references(model))
    record: dict[str, Any] = dict(head=with_head)
    headless = _attempt(record, "headless", lambda: _headless_timm_model(name, model))
    if headless is not None:
        references = timm_references(headless)
        del references["unpooled"]
        record["headless"] = _compared(head_features(headless, x, ("pooled", "embedding")), references)
    return record


def _headless_timm_model(name: str, model: nn.Module) -> nn.Module:
    """timm's ``num_classes=0`` model of ``name`` carrying ``model``'s weights."""
    headless = build_model(f"timm:{name}", num_classes=0)
    missing = headless.load_state_dict(model.state_dict(), strict=False).missing_keys
    if missing:
        raise ValueError(f"the num_classes=0 model has weights the model does not: {missing[:3]}")
    return headless.eval()


def _check_torchvision_heads(name: str, model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """torchvision's head features, and those of the model with an ``nn.Identity`` head (module docstring)."""
    identity_head, path = without_final_linear(model)
    pooled_reference = functools.cache(lambda: identity_head(x))
    record: dict[str, Any] = dict(head=_compared(
        head_features(model, x, ("pooled", "embedding")), dict(pooled=pooled_reference, embedding=lambda: model(x))))
    record["final_linear"] = path
    if path is not None:
        record["identity_head"] = _compared(head_features(identity_head, x, ("pooled", "embedding")),
                                            dict(pooled=pooled_reference, embedding=pooled_reference))
    return record


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
