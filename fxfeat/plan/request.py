"""Validate the arguments of ``compile``/``inspect`` into a frozen :class:`Request`.

Example:
    >>> import torchvision
    >>> from fxfeat.plan import make_request
    >>> make_request(torchvision.models.resnet18(), out_indices=[1, -1]).out_indices
    (1, -1)
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from fxfeat.errors import InvalidModelError, InvalidRequestError
from fxfeat.trace import DEFAULT_INPUT_SIZE

__all__ = ["MODES", "OUTPUT_FORMATS", "Request", "make_request"]

MODES = ("features", "unpooled", "pooled", "embedding", "logits")
OUTPUT_FORMATS = ("NCHW", "native")


@dataclass(frozen=True)
class Request:
    """What the user asked for, validated. See :func:`fxfeat.compile` for the meaning of each field."""

    mode: str = "features"
    out_indices: int | tuple[int, ...] | None = None
    output_stride: int | None = None
    levels: str | tuple[str, ...] | None = None
    input_size: tuple[int, int, int] = DEFAULT_INPUT_SIZE
    output_fmt: str = "NCHW"
    return_dict: bool = False
    num_classes: int | None = None


def _model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """The input size a model declares: timm's ``pretrained_cfg``/``default_cfg``, or the ``image_size`` and
    ``num_channels`` of a Hugging Face model's ``config``, else 3x224x224; with the height and width the model
    itself was built for where it records them (a patch embedding's ``img_size``, a module's ``image_size``), as
    a timm ViT built with ``img_size=64`` keeps the ``pretrained_cfg`` of its 224-pixel default."""
    declared = None
    for attribute in ("pretrained_cfg", "default_cfg"):
        config = getattr(model, attribute, None)
        size = config.get("input_size") if isinstance(config, dict) else None
        if _ints(size, 3):
            declared = tuple(size)
            break
    if declared is None:
        config = getattr(model, "config", None)
        channels, size = getattr(config, "num_channels", None), getattr(config, "image_size", None)
        channels = channels if _positive_int(channels) else DEFAULT_INPUT_SIZE[0]
        size = (size, size) if _positive_int(size) else size
        declared = (channels, *size) if _ints(size, 2) else (channels, *DEFAULT_INPUT_SIZE[1:])
    built = _built_image_size(model)
    return (declared[0], *built) if built is not None else declared


def _built_image_size(model: nn.Module) -> tuple[int, int] | None:
    """The height and width the first module that records one (``img_size`` or ``image_size``, an int or a pair)
    was built for."""
    for module in model.modules():
        for attribute in ("img_size", "image_size"):
            size = module.__dict__.get(attribute)
            size = (size, size) if _positive_int(size) else tuple(size) if isinstance(size, (tuple, list)) else None
            if _ints(size, 2):
                return size
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _ints(values: Any, length: int) -> bool:
    """Whether ``values`` is a sequence of ``length`` positive ints."""
    return isinstance(values, Sequence) and len(values) == length and all(_positive_int(value) for value in values)


def _check_input_size(input_size: Any) -> tuple[int, int, int]:
    if (
        not _is_sequence(input_size)
        or len(input_size) != 3
        or not all(_as_int(d) is not None and _as_int(d) > 0 for d in input_size)
    ):
        raise InvalidRequestError(
            f"input_size must be (channels, height, width) as three positive ints; got {input_size!r}.",
            hint="e.g. input_size=(3, 224, 224).",
        )
    return tuple(_as_int(d) for d in input_size)


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer of any kind (``int``, numpy, a 0-d tensor, ``16.0``), else None."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return None


def _check_out_indices(out_indices: Any) -> int | tuple[int, ...] | None:
    if out_indices is None:
        return None
    if _as_int(out_indices) is not None and not _is_sequence(out_indices):
        return _as_int(out_indices)
    if _is_sequence(out_indices):
        indices = [_as_int(i) for i in out_indices]
        if all(i is not None for i in indices):
            if not indices:
                raise InvalidRequestError("out_indices is empty.", hint="select at least one level, or pass None.")
            return tuple(indices)
    raise InvalidRequestError(
        f"out_indices must be None, an int (the last n levels) or a sequence of level indices; "
        f"got {out_indices!r}.",
        hint="e.g. out_indices=(1, 2, 3), out_indices=(-1,) or out_indices=3.",
    )


def _is_sequence(value: Any) -> bool:
    """A list, tuple, range or 1-d array (numpy or torch), not a string."""
    if isinstance(value, (str, bytes)):
        return False
    if isinstance(value, Sequence):
        return True
    return getattr(value, "ndim", None) == 1 and hasattr(value, "__iter__")


def _check_output_stride(output_stride: Any) -> int | None:
    if output_stride is None:
        return None
    value = _as_int(output_stride)
    if value not in (8, 16, 32):
        raise InvalidRequestError(
            f"output_stride must be None, 8, 16 or 32; got {output_stride!r}.", hint="e.g. output_stride=16."
        )
    return value


def _check_levels(levels: Any) -> str | tuple[str, ...] | None:
    if levels is None or levels in ("auto", "declared"):
        return levels
    if isinstance(levels, Sequence) and not isinstance(levels, str) and levels and all(
        isinstance(name, str) for name in levels
    ):
        repeated = sorted({name for name in levels if levels.count(name) > 1})
        if repeated:
            raise InvalidRequestError(
                f"levels names {', '.join(map(repr, repeated))} more than once; each level is returned once.",
                hint="list each module path or node name once.",
            )
        return tuple(levels)
    raise InvalidRequestError(
        f"levels must be None, 'auto', 'declared' or a non-empty list of module paths / fx node names; got "
        f"{levels!r}.",
        hint="run fxfeat.inspect(model) to see the levels and candidate nodes.",
    )


def make_request(
    model: Any,
    *,
    mode: str = "features",
    out_indices: Any = None,
    output_stride: Any = None,
    levels: Any = None,
    input_size: Any = None,
    output_fmt: str = "NCHW",
    return_dict: bool = False,
    num_classes: Any = None,
) -> Request:
    """Check every argument and fill in defaults taken from the model.

    Raises:
        InvalidModelError: ``model`` is not an ``nn.Module``.
        InvalidRequestError: an argument is malformed.
    """
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"fxfeat compiles torch.nn.Module instances; got {type(model).__name__}.",
            hint="pass the model object itself, e.g. fxfeat.compile(torchvision.models.resnet50()).",
        )
    if mode not in MODES:
        raise InvalidRequestError(f"Unknown mode {mode!r}.", hint=f"use one of {', '.join(map(repr, MODES))}.")
    if output_fmt not in OUTPUT_FORMATS:
        raise InvalidRequestError(
            f"Unknown output_fmt {output_fmt!r}.", hint=f"use one of {', '.join(map(repr, OUTPUT_FORMATS))}."
        )
    output_stride = _check_output_stride(output_stride)
    if num_classes is not None:
        num_classes = num_classes if _as_int(num_classes) is None else _as_int(num_classes)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 0:
            raise InvalidRequestError(
                f"num_classes must be a non-negative int; got {num_classes!r}.", hint="e.g. num_classes=10."
            )
        if mode != "pooled":
            raise InvalidRequestError(
                f"num_classes={num_classes} puts a new classifier on pooled features, but mode={mode!r}.",
                hint="use mode='pooled' with num_classes.",
            )
    if mode != "features" and (out_indices is not None or levels is not None):
        raise InvalidRequestError(
            f"mode={mode!r} returns one tensor; out_indices and levels select levels of mode='features'.",
            hint="drop out_indices/levels, or use mode='features'.",
        )
    return Request(
        mode=mode,
        out_indices=_check_out_indices(out_indices),
        output_stride=output_stride,
        levels=_check_levels(levels),
        input_size=_model_input_size(model) if input_size is None else _check_input_size(input_size),
        output_fmt=output_fmt,
        return_dict=bool(return_dict),
        num_classes=num_classes or None,
    )
