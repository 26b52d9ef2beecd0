"""The model's own preprocessing: resize, crop and normalisation as its library defines them for evaluation.

Resolved, in order, from torchvision's weights transforms (a ``torchvision:NAME`` model), a Hugging Face image
processor's ``preprocessor_config.json`` (an ``hf:PATH`` model, or a model whose ``config._name_or_path`` is such a
directory), timm's ``pretrained_cfg`` (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``,
``std``, as ``timm.data.resolve_data_config`` reads them), else the ImageNet defaults (shorter edge to 256, centre
crop 224, bilinear, ImageNet mean and std). A :class:`Preprocessing` runs on uint8 ``(C, H, W)`` tensors in the
DataLoader workers (resize with antialiasing, then crop) and normalises whole batches on the device, with the same
floating-point operations as torchvision's ``ToTensor`` + ``Normalize``.

Example:
    >>> import timm
    >>> steps = resolve_preprocessing(timm.create_model("resnet18"))
    >>> steps.size, steps.resize, steps.interpolation, steps.source
    ((224, 224), (235,), 'bicubic', 'timm pretrained_cfg')
    >>> import torch
    >>> steps(torch.zeros(3, 480, 640, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from fxfeat.errors import InvalidRequestError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "resolve_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_CROP_FRACTION = 0.875
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                   "nearest": InterpolationMode.NEAREST, "nearest-exact": InterpolationMode.NEAREST_EXACT}
_PIL_RESAMPLE = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bicubic"}  # 1 LANCZOS


@dataclass(frozen=True)
class Preprocessing:
    """Resize, crop and normalise, as recorded in the manifest.

    Attributes:
        size: ``(H, W)`` of the images the model sees.
        resize: the resize target: ``(shorter edge,)`` for ``"shorter"`` (torchvision's ``Resize(int)``; the other
            edge keeps the aspect ratio, truncated), ``(H, W)`` for ``"keep_ratio"`` (scale so that both edges
            reach at least H and W, rounded, as timm's ``ResizeKeepRatio``), ``"longest"`` (both edges at most H
            and W) and ``"exact"`` (to exactly H x W); ``None``: no resize.
        resize_mode: ``"shorter"``, ``"keep_ratio"``, ``"longest"``, ``"exact"`` or ``None``.
        crop: ``"center"`` (torchvision's ``center_crop``: zero padding where the image is smaller),
            ``"center_pad"`` (padding with the mean colour, timm's ``border`` mode) or ``None``.
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"nearest-exact"``, antialiased.
        mean, std: per-channel normalisation of values in [0, 1].
        source: where the values come from.
    """

    size: tuple[int, int]
    resize: tuple[int, ...] | None
    resize_mode: str | None
    crop: str | None
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Resize and crop a uint8 ``(C, H, W)`` image to ``(C, *size)`` (still uint8)."""
        height, width = image.shape[-2:]
        target = self._resized_size(height, width)
        if target is not None and target != (height, width):
            image = F.resize(image, list(target), interpolation=_INTERPOLATIONS[self.interpolation], antialias=True)
        if self.crop == "center_pad" and any(have < want for have, want in zip(image.shape[-2:], self.size)):
            fill = [round(255 * value) for value in self.mean]
            image = _pad_to(image, self.size, fill)
        if self.crop is not None and tuple(image.shape[-2:]) != self.size:
            image = F.center_crop(image, list(self.size))
        return image

    def _resized_size(self, height: int, width: int) -> tuple[int, int] | None:
        if self.resize_mode is None:
            return None
        if self.resize_mode == "shorter":
            short, long = sorted((height, width))
            new_short, new_long = self.resize[0], int(self.resize[0] * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        if self.resize_mode == "exact":
            return tuple(self.resize)
        ratios = (height / self.resize[0], width / self.resize[1])
        ratio = max(ratios) if self.resize_mode == "longest" else min(ratios)
        return round(height / ratio), round(width / ratio)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 ``(N, C, H, W)`` batch as float32, in [0, 1], normalised (``ToTensor`` then ``Normalize``)."""
        mean = torch.tensor(self.mean, device=batch.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(-1, 1, 1)
        return batch.float().div(255).sub_(mean).div_(std)

    def for_channels(self, channels: int) -> Preprocessing:
        """The same steps for a model taking ``channels`` channels: a 3-value mean/std is averaged for one channel
        (timm keeps the 3-channel values in the config of its ``in_chans=1`` models)."""
        if len(self.mean) == channels:
            return self
        if channels == 1:
            return replace(self, mean=(sum(self.mean) / len(self.mean),), std=(sum(self.std) / len(self.std),))
        raise InvalidRequestError(
            f"the preprocessing ({self.source}) normalises {len(self.mean)} channels, the model takes {channels}.",
            hint="pass transform= with a preprocessing of your own.",
        )

    def with_size(self, size: tuple[int, int]) -> Preprocessing:
        """The same steps producing ``size`` images, the resize scaled by as much as the crop."""
        if tuple(size) == self.size:
            return self
        resize = None if self.resize is None else tuple(
            math.floor(edge * new / old) for edge, new, old in zip(self.resize, (size * 2)[: len(self.resize)],
                                                                     self.size))
        return replace(self, size=tuple(size), resize=resize)

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def _pad_to(image: torch.Tensor, size: tuple[int, int], fill: list[int]) -> torch.Tensor:
    height, width = image.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    canvas = torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1).expand(image.shape[0], height + pad_h,
                                                                         width + pad_w).clone()
    canvas[:, pad_h // 2: pad_h // 2 + height, pad_w // 2: pad_w // 2 + width] = image
    return canvas


def resolve_preprocessing(model: nn.Module, input_size: tuple[int, int, int] | None = None,
                          spec: str | None = None) -> Preprocessing:
    """The model's own evaluation preprocessing (see the module docstring), for ``input_size`` if given (the
    resize scaled with the crop) and the number of channels it takes."""
    size = tuple(input_size[1:]) if input_size is not None else None
    steps = (_torchvision_preprocessing(spec) or _hugging_face_preprocessing(model, spec)
             or _timm_preprocessing(model, size) or _default_preprocessing(size))
    if input_size is not None:
        steps = steps.with_size(tuple(input_size[1:])).for_channels(input_size[0])
    return steps


def _torchvision_preprocessing(spec: str | None) -> Preprocessing | None:
    if not spec or not spec.startswith("torchvision:"):
        return None
    import torchvision

    weights = torchvision.models.get_model_weights(spec.partition(":")[2]).DEFAULT
    transforms = weights.transforms()
    crop, resize = transforms.crop_size, transforms.resize_size
    return Preprocessing(
        size=(crop[0], crop[-1]), resize=tuple(resize), resize_mode="shorter" if len(resize) == 1 else "exact",
        crop="center", interpolation=transforms.interpolation.value, mean=tuple(transforms.mean),
        std=tuple(transforms.std), source=f"torchvision weights {weights}",
    )


def _hugging_face_preprocessing(model: nn.Module, spec: str | None) -> Preprocessing | None:
    directory = spec.partition(":")[2] if spec and spec.startswith("hf:") else getattr(
        getattr(model, "config", None), "_name_or_path", None)
    path = os.path.join(directory, "preprocessor_config.json") if isinstance(directory, str) and directory else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    size = config.get("size") or {}
    size = {"height": size, "width": size} if isinstance(size, int) else size
    crop_size = config.get("crop_size") or {}
    crop_size = {"height": crop_size, "width": crop_size} if isinstance(crop_size, int) else crop_size
    interpolation = _PIL_RESAMPLE.get(config.get("resample", 2), "bilinear")
    mean = tuple(config.get("image_mean") or IMAGENET_MEAN) if config.get("do_normalize", True) else (0.0,) * 3
    std = tuple(config.get("image_std") or IMAGENET_STD) if config.get("do_normalize", True) else (1.0,) * 3
    if "shortest_edge" in size:
        edge = size["shortest_edge"]
        if "crop_pct" in config and edge < 384:  # ConvNeXt's processor: resize to edge / crop_pct, crop to edge
            resize, crop = (int(edge / config["crop_pct"]),), (edge, edge)
        else:
            resize = (edge,)
            crop = (crop_size["height"], crop_size["width"]) if config.get("do_center_crop") and crop_size else None
            crop = crop or (edge, edge)
        mode = "shorter"
    else:
        resize, mode = (size["height"], size["width"]), "exact"
        crop = ((crop_size["height"], crop_size["width"]) if config.get("do_center_crop") and crop_size
                else resize)
    return Preprocessing(size=tuple(crop), resize=tuple(resize), resize_mode=mode, crop="center",
                         interpolation=interpolation, mean=mean, std=std,
                         source=f"hugging face {config.get('image_processor_type', 'image processor')} "
                         f"({path})")


def _timm_preprocessing(model: nn.Module, size: tuple[int, int] | None) -> Preprocessing | None:
    """As timm's ``resolve_data_config`` + ``transforms_imagenet_eval``; another ``size`` is resized from
    ``size / crop_pct``, as timm's ``input_size`` argument is."""
    config = getattr(model, "pretrained_cfg", None)
    if not isinstance(config, dict) or not config.get("input_size"):
        return None
    size = size or tuple(config["input_size"][1:])
    fraction = config.get("crop_pct") or _DEFAULT_CROP_FRACTION
    scaled = tuple(math.floor(edge / fraction) for edge in size)
    mode = config.get("crop_mode") or "center"
    if mode == "squash":
        resize, resize_mode, crop = scaled, "exact", "center"
    elif mode == "border":
        resize, resize_mode, crop = scaled, "longest", "center_pad"
    elif scaled[0] == scaled[1]:
        resize, resize_mode, crop = scaled[:1], "shorter", "center"
    else:
        resize, resize_mode, crop = scaled, "keep_ratio", "center"
    return Preprocessing(size=size, resize=resize, resize_mode=resize_mode,
                         crop=crop, interpolation=config.get("interpolation") or "bicubic",
                         mean=tuple(config.get("mean") or IMAGENET_MEAN), std=tuple(config.get("std") or IMAGENET_STD),
                         source="timm pretrained_cfg")


def _default_preprocessing(size: tuple[int, int] | None) -> Preprocessing:
    size = size or (224, 224)
    scaled = tuple(math.floor(edge / _DEFAULT_CROP_FRACTION) for edge in size)
    return Preprocessing(size=size, resize=scaled[:1] if scaled[0] == scaled[1] else scaled,
                         resize_mode="shorter" if scaled[0] == scaled[1] else "keep_ratio", crop="center",
                         interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         source="ImageNet defaults (shorter edge to size / 0.875, centre crop, bilinear)")
