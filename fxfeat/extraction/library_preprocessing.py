"""Each library's own evaluation transform for a model, asked of the library, and how it reads as resize + crop +
normalise.

- torchvision: the weights' ``transforms()`` (a ``torchvision:NAME`` model: its ``DEFAULT`` weights);
- transformers: ``AutoImageProcessor.from_pretrained`` of the model's directory (``hf:PATH``, or the
  ``config._name_or_path`` of a model loaded from one), where it holds an image processor's configuration;
- open_clip: ``open_clip.image_transform`` of the tower's ``preprocess_cfg`` (open_clip sets it on ``model.visual``);
- timm: ``timm.data.create_transform`` of ``timm.data.resolve_model_data_config(model)``.

Each gives the library's callable (a PIL image in, a normalised float ``(C, H, W)`` tensor out) and the readings of
it as :class:`~fxfeat.extraction.preprocess.Preprocessing` fields; the caller checks a reading against the callable
before using it. A reading is a dict of those fields, so that this module needs nothing of the one using it.

Example:
    >>> import timm
    >>> found = library_preprocessing(timm.create_model("resnet18"), None, None)
    >>> found.source, found.readings[0]["resize"], found.readings[0]["size"]
    ('timm resolve_model_data_config + create_transform', (235,), (224, 224))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision import transforms as v1
from torchvision.transforms import v2

__all__ = ["LibraryPreprocessing", "library_preprocessing"]

_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes of the kernels torchvision has


@dataclass(frozen=True)
class LibraryPreprocessing:
    """A library's transform for one model.

    Attributes:
        source: the library and the call that gave it.
        transform: the library's callable: a PIL image in, a normalised float ``(C, H, W)`` tensor out.
        readings: the transform read as resize + crop + normalise, as ``Preprocessing`` fields (without
            ``source``), most likely first; empty where it does not read as such.
    """

    source: str
    transform: Callable[[Any], torch.Tensor]
    readings: tuple[dict[str, Any], ...]


def library_preprocessing(model: nn.Module, spec: str | None, size: tuple[int, int] | None,
                          ) -> LibraryPreprocessing | None:
    """The first library that defines ``model``'s preprocessing (see the module docstring), at ``size`` where
    the library takes a size (timm, open_clip), else at its own; ``None`` where none does."""
    return (_torchvision(spec) or _transformers(model, spec) or _open_clip(model, size)
            or _timm(model, size))


def _torchvision(spec: str | None) -> LibraryPreprocessing | None:
    if not spec or not spec.startswith("torchvision:"):
        return None
    import torchvision

    weights = torchvision.models.get_model_weights(spec.partition(":")[2]).DEFAULT
    transform = weights.transforms()
    readings = _read_compose(transform) if hasattr(transform, "transforms") else _read_classification(transform)
    return LibraryPreprocessing(f"torchvision {weights} transforms()", transform, readings)


def _read_classification(transform: Any) -> tuple[dict[str, Any], ...]:
    """torchvision's ``ImageClassification`` (resize, centre crop, normalise) by its attributes."""
    crop, resize = list(getattr(transform, "crop_size", [])), list(getattr(transform, "resize_size", []))
    if not crop or not resize:
        return ()
    return ({"size": (crop[0], crop[-1]), "resize": tuple(resize), "resize_mode": "shorter" if len(resize) == 1
             else "exact", "crop": "center", "interpolation": _interpolation(transform.interpolation),
             "mean": tuple(transform.mean), "std": tuple(transform.std)},)


def _transformers(model: nn.Module, spec: str | None) -> LibraryPreprocessing | None:
    directory = spec.partition(":")[2] if spec and spec.startswith("hf:") else getattr(
        getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(directory, str) or not os.path.isfile(os.path.join(directory, "preprocessor_config.json")):
        return None
    import transformers

    processor = transformers.AutoImageProcessor.from_pretrained(directory)
    return LibraryPreprocessing(f"transformers AutoImageProcessor: {type(processor).__name__} ({directory})",
                                _ImageProcessorCall(processor), _read_image_processor(processor))


class _ImageProcessorCall:
    """A Hugging Face image processor as a transform of one PIL image."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"{type(self.processor).__name__}({json.dumps(self.processor.to_dict(), sort_keys=True, default=str)})"


def _field(values: Any, name: str) -> Any:
    return values.get(name) if isinstance(values, dict) else getattr(values, name, None)


def _read_image_processor(processor: Any) -> tuple[dict[str, Any], ...]:
    """The resize + crop + normalise readings of an image processor's attributes: the shorter edge or an exact
    size, a centre crop, and, with a ``crop_pct``, ConvNeXt's resize to the edge / ``crop_pct`` before the crop."""
    if _field(processor, "do_rescale") is False or abs((_field(processor, "rescale_factor") or 1 / 255)
                                                       - 1 / 255) > 1e-12:
        return ()
    normalize = _field(processor, "do_normalize") is not False
    mean = tuple(_field(processor, "image_mean") or ()) if normalize else (0.0, 0.0, 0.0)
    std = tuple(_field(processor, "image_std") or ()) if normalize else (1.0, 1.0, 1.0)
    interpolation = _PIL_RESAMPLE.get(int(_field(processor, "resample") or 2))
    size, crop_size = _field(processor, "size") or {}, _field(processor, "crop_size") or {}
    crop = None
    if _field(processor, "do_center_crop") and _field(crop_size, "height"):
        crop = (_field(crop_size, "height"), _field(crop_size, "width"))
    edge, height, width = (_field(size, key) for key in ("shortest_edge", "height", "width"))
    resizes = []
    if _field(processor, "do_resize") is False:
        resizes.append((None, None, crop))
    elif height and width:
        resizes.append(((height, width), "exact", crop or (height, width)))
    elif edge and not _field(size, "longest_edge"):
        fraction = _field(processor, "crop_pct")
        if fraction:
            resizes.append(((int(edge / fraction),), "shorter", (edge, edge)))
            resizes.append(((edge, edge), "exact", (edge, edge)))
        resizes.append(((edge,), "shorter", crop or (edge, edge)))
    if interpolation is None or len(mean) != len(std) or not mean:
        return ()
    return tuple({"size": tuple(out), "resize": resize, "resize_mode": mode, "crop": "center",
                  "interpolation": interpolation, "mean": mean, "std": std}
                 for resize, mode, out in resizes if out is not None)


def _open_clip(model: nn.Module, size: tuple[int, int] | None) -> LibraryPreprocessing | None:
    config = getattr(model, "preprocess_cfg", None)
    if not isinstance(config, dict) or "mean" not in config:
        return None
    import open_clip

    config = {**config, "size": size} if size is not None else config
    transform = open_clip.image_transform(
        config["size"], is_train=False, mean=config.get("mean"), std=config.get("std"),
        interpolation=config.get("interpolation"), resize_mode=config.get("resize_mode"),
        fill_color=config.get("fill_color", 0))
    return LibraryPreprocessing("open_clip image_transform of the tower's preprocess_cfg", transform,
                                _read_compose(transform))


def _timm(model: nn.Module, size: tuple[int, int] | None) -> LibraryPreprocessing | None:
    if not isinstance(getattr(model, "pretrained_cfg", None), dict) or not model.pretrained_cfg.get("input_size"):
        return None
    import timm.data

    config = timm.data.resolve_model_data_config(model)
    if size is not None:
        config["input_size"] = (config["input_size"][0], *size)
    transform = timm.data.create_transform(**config)
    return LibraryPreprocessing("timm resolve_model_data_config + create_transform", transform,
                                _read_compose(transform))


def _interpolation(mode: Any) -> str | None:
    value = getattr(mode, "value", mode)
    return value if isinstance(value, str) else None


def _read_compose(transform: Any) -> tuple[dict[str, Any], ...]:
    """A ``Compose`` of a resize, a centre crop (with or without padding) and a normalisation, read step by step.
    Steps that do not move or scale pixels (to a tensor, to RGB) are passed over: the check against the transform
    itself is what decides."""
    reading: dict[str, Any] = {"size": None, "resize": None, "resize_mode": None, "crop": None,
                               "interpolation": "bilinear", "mean": None, "std": None}
    for step in getattr(transform, "transforms", ()):
        if isinstance(step, (v1.Resize, v2.Resize)):
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            if getattr(step, "max_size", None) is not None:
                return ()
            reading.update(resize=tuple(size), resize_mode="shorter" if len(size) == 1 else "exact",
                           interpolation=_interpolation(step.interpolation))
        elif all(hasattr(step, name) for name in ("size", "interpolation", "longest")):  # a keep-ratio resize
            modes = {0: "keep_ratio", 1: "longest"}
            if step.longest not in modes:
                return ()
            size = [step.size] * 2 if isinstance(step.size, int) else list(step.size)
            reading.update(resize=tuple(size), resize_mode=modes[step.longest],
                           interpolation=_interpolation(step.interpolation))
        elif isinstance(step, (v1.CenterCrop, v2.CenterCrop)):
            reading.update(crop="center", size=_pair(step.size))
        elif hasattr(step, "size") and hasattr(step, "fill"):  # a centre crop that pads with a colour
            reading.update(crop="center_pad", size=_pair(step.size))
        elif isinstance(step, (v1.Normalize, v2.Normalize)):
            reading.update(mean=_floats(step.mean), std=_floats(step.std))
    if reading["size"] is None and reading["resize_mode"] == "exact":
        reading["size"] = reading["resize"]
    if reading["size"] is None or reading["mean"] is None or reading["interpolation"] is None:
        return ()
    return (reading,)


def _floats(values: Any) -> tuple[float, ...]:
    """Python floats of a sequence; of a tensor, the shortest decimals its float32 values round to (timm keeps
    ``(0.485, 0.456, 0.406)`` as a tensor)."""
    if isinstance(values, torch.Tensor):
        return tuple(float(np.format_float_positional(value, unique=True)) for value in values.float().numpy())
    return tuple(float(value) for value in values)


def _pair(size: Any) -> tuple[int, int]:
    size = [size] if isinstance(size, int) else list(size)
    return (size[0], size[-1])
