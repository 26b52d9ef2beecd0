"""The model's own preprocessing: resize, crop and normalisation as its library defines them for evaluation.

Asked of the library that made the model (:mod:`fxfeat.extraction.library_preprocessing`): torchvision's weights
transforms (a ``torchvision:NAME`` model), a Hugging Face ``AutoImageProcessor`` (an ``hf:PATH`` model, or a model
whose ``config._name_or_path`` is a directory holding an image processor's configuration), open_clip's transform
of the tower's ``preprocess_cfg``, timm's ``create_transform`` of ``resolve_model_data_config``; else the ImageNet
defaults (shorter edge to size / 0.875, centre crop, bilinear, ImageNet mean and std) at the model's input size.

Where the library's transform reads as resize + crop + normalise, and the reading gives what the transform gives on
two photo-like images (within the rounding of a uint8 resize), it runs as a :class:`Preprocessing`: on uint8
``(C, H, W)`` tensors in the DataLoader workers (resize with antialiasing, then crop), normalising whole batches on
the device with the same floating-point operations as torchvision's ``ToTensor`` + ``Normalize``. Otherwise the
library's own callable runs on PIL images in the workers, as a :class:`LibraryTransform`. The manifest records
which, and the source.

Example:
    >>> import timm
    >>> steps = resolve_preprocessing(timm.create_model("resnet18"))
    >>> steps.size, steps.resize, steps.interpolation, steps.source
    ((224, 224), (235,), 'bicubic', 'timm resolve_model_data_config + create_transform')
    >>> import torch
    >>> steps(torch.zeros(3, 480, 640, dtype=torch.uint8)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from fxfeat.errors import InvalidRequestError
from fxfeat.extraction.decode import image_tensor
from fxfeat.extraction.library_preprocessing import LibraryPreprocessing, library_preprocessing
from fxfeat.plan import make_request

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LibraryTransform", "Preprocessing", "difference_in_levels",
           "resolve_preprocessing"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_DEFAULT_CROP_FRACTION = 0.875
_INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                   "nearest": InterpolationMode.NEAREST, "nearest-exact": InterpolationMode.NEAREST_EXACT}
_APPLIED = "fxfeat: uint8 resize and crop in the DataLoader workers, normalised on the device"
# How far fxfeat's uint8 resize may be from a library's PIL one and still count as the same transform. PIL and
# torchvision's antialiased uint8 kernels round apart by one or two intensity levels: on under 1% of the values,
# on about 16% of a portrait picture squashed to a square (0.17 levels on average). A misread transform is far off:
# one pixel more in the resize, or bilinear for bicubic, moves the average by 0.8 levels or more and the largest by 4+.
_MAX_LEVELS, _MAX_MEAN_LEVELS = 3, 0.25


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
        return {**{key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()},
                "applied": _APPLIED}


@dataclass(frozen=True)
class LibraryTransform:
    """A library's own transform, run as it is on PIL images in the DataLoader workers: for the transforms that do
    not read as resize + crop + normalise.

    Attributes:
        transform: the library's callable (a PIL image in, a normalised float ``(C, H, W)`` tensor out).
        size: ``(H, W)`` of what it returns; ``channels``: its number of channels.
        source: where it comes from; ``reason``: why it does not run as a :class:`Preprocessing`.
    """

    transform: Callable[[Any], torch.Tensor]
    size: tuple[int, int]
    channels: int
    source: str
    reason: str

    def __call__(self, image: Any) -> torch.Tensor:
        """The library's transform of ``image`` (a PIL image, or a dataset's array or tensor), given as an RGB (or
        the model's mode) PIL image converted as fxfeat's own decoding converts it (grayscale, RGBA, 16-bit, CMYK)."""
        return self.transform(F.to_pil_image(image_tensor(image, self.channels)))

    def with_size(self, size: tuple[int, int]) -> LibraryTransform:
        if tuple(size) != self.size:
            raise InvalidRequestError(
                f"the model's preprocessing ({self.source}) makes {self.size[0]}x{self.size[1]} images and runs as "
                f"the library's own transform, which fxfeat cannot resize to {size[0]}x{size[1]}.",
                hint="leave input_size out, or pass transform= with a preprocessing of that size.")
        return self

    def for_channels(self, channels: int) -> LibraryTransform:
        if channels != self.channels:
            raise InvalidRequestError(f"the preprocessing ({self.source}) makes {self.channels} channels, the model "
                                      f"takes {channels}.", hint="pass transform= with a preprocessing of your own.")
        return self

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "applied": "the library's own transform, on PIL images in the DataLoader "
                "workers", "reason": self.reason, "size": list(self.size), "transform": repr(self.transform)}


def _pad_to(image: torch.Tensor, size: tuple[int, int], fill: list[int]) -> torch.Tensor:
    height, width = image.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    canvas = torch.tensor(fill, dtype=image.dtype).view(-1, 1, 1).expand(image.shape[0], height + pad_h,
                                                                         width + pad_w).clone()
    canvas[:, pad_h // 2: pad_h // 2 + height, pad_w // 2: pad_w // 2 + width] = image
    return canvas


def resolve_preprocessing(model: nn.Module, input_size: tuple[int, int, int] | None = None,
                          spec: str | None = None) -> Preprocessing | LibraryTransform:
    """The model's own evaluation preprocessing (see the module docstring), for ``input_size`` if given (timm and
    open_clip asked for that size, the others' resize scaled with the crop) and the number of channels it takes."""
    size = tuple(input_size[1:]) if input_size is not None else None
    found = library_preprocessing(model, spec, size)
    if found is None:
        steps = _default_preprocessing(size or tuple(make_request(model).input_size[1:]))
    else:
        steps = _fast_or_callable(found)
    if input_size is not None:
        steps = steps.with_size(size).for_channels(input_size[0])
    return steps


def _fast_or_callable(found: LibraryPreprocessing) -> Preprocessing | LibraryTransform:
    """The first reading of the library's transform that gives what the transform gives on the probe images,
    else the transform itself."""
    images = _probe_images()
    references = [found.transform(image) for image in images]
    reason = "it does not read as resize + crop + normalise"
    for reading in found.readings:
        steps = Preprocessing(**reading, source=found.source)
        largest, mean = difference_in_levels(steps, images, references)
        if largest <= _MAX_LEVELS and mean <= _MAX_MEAN_LEVELS:
            return steps
        reason = (f"read as resize + crop + normalise ({steps.resize_mode} {list(steps.resize or [])}, crop "
                  f"{list(steps.size)}), it differs from the transform by up to {largest:.0f} intensity levels, "
                  f"{mean:.2f} on average")
    shape = tuple(references[0].shape)
    return LibraryTransform(found.transform, shape[1:], shape[0], found.source, reason)


def _probe_images() -> list[Image.Image]:
    """Two smooth random pictures of odd sizes, landscape and portrait (photo-like, so that resizing rounds as it
    does on photos)."""
    images = []
    for seed, (height, width) in enumerate(((301, 457), (389, 253))):
        coarse = np.random.default_rng(seed).random((height // 8 + 1, width // 8 + 1, 3))
        images.append(Image.fromarray((coarse * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC))
    return images


def difference_in_levels(steps: Preprocessing, images: list[Image.Image], references: list[torch.Tensor],
                         ) -> tuple[float, float]:
    """The largest and the mean difference between ``steps`` and a transform's ``references`` on ``images``, in
    intensity levels (1/255 before normalisation); infinite where the shapes differ."""
    std = torch.tensor(steps.std).view(-1, 1, 1) * 255
    largest, total, count = 0.0, 0.0, 0
    for image, reference in zip(images, references):
        pixels = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1).contiguous()
        ours = steps.normalize(steps(pixels)[None])[0]
        if not isinstance(reference, torch.Tensor) or ours.shape != reference.shape or len(steps.std) != len(ours):
            return math.inf, math.inf
        levels = (ours - reference.float()).abs() * std
        largest, total, count = max(largest, levels.max().item()), total + levels.sum().item(), count + levels.numel()
    return largest, total / count


def _default_preprocessing(size: tuple[int, int] | None) -> Preprocessing:
    size = size or (224, 224)
    scaled = tuple(math.floor(edge / _DEFAULT_CROP_FRACTION) for edge in size)
    return Preprocessing(size=size, resize=scaled[:1] if scaled[0] == scaled[1] else scaled,
                         resize_mode="shorter" if scaled[0] == scaled[1] else "keep_ratio", crop="center",
                         interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         source="ImageNet defaults (shorter edge to size / 0.875, centre crop, bilinear)")
