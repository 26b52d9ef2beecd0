"""Feature maps on an image: the image as the model sees it, then each returned level's map reduced to three
channels by principal component analysis and shown as RGB at its own resolution (token levels as their grids).

Example:
    >>> import torch
    >>> feature_map = torch.randn(64, 7, 9)
    >>> principal_rgb(feature_map).shape, float(principal_rgb(feature_map).max())
    ((7, 9, 3), 1.0)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxfeat.drawing.summary import Level
from fxfeat.errors import InvalidRequestError
from fxfeat.extraction.decode import image_tensor
from fxfeat.extraction.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from fxfeat.module import FeatureGraphModule
from fxfeat.trace import evaluation_mode

__all__ = ["draw_maps", "level_maps", "model_input", "plain_resize", "principal_rgb"]

_PANEL_INCHES = 2.3
_IMAGE_HINT = "give the path of an image file, a PIL image, or a tensor: uint8 (C, H, W) pixels, or a float " \
              "(C, H, W) tensor already preprocessed for the model"


def plain_resize(size: tuple[int, int], channels: int = 3) -> Preprocessing:
    """A resize to ``size`` with ImageNet normalisation: for an extractor, which keeps no preprocessing of its
    model.

    Example:
        >>> plain_resize((160, 128)).source
        'a plain resize to 160×128 with ImageNet normalisation'
    """
    steps = Preprocessing(size=tuple(size), resize=tuple(size), resize_mode="exact", crop=None,
                          interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          source=f"a plain resize to {size[0]}×{size[1]} with ImageNet normalisation")
    return steps.for_channels(channels)


def _opened(image: Any) -> Any:
    """A path as a PIL image; anything else as it is."""
    if not isinstance(image, (str, Path)):
        return image
    from PIL import Image, UnidentifiedImageError

    if not Path(image).is_file():
        raise InvalidRequestError(f"The image {str(image)!r} does not exist.", hint=_IMAGE_HINT + ".")
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidRequestError(f"{str(image)!r} is not an image PIL can read ({error}).",
                                  hint=_IMAGE_HINT + ".") from None


def model_input(image: Any, preprocessing: Callable | None, channels: int) -> tuple[torch.Tensor, str]:
    """``image`` as the model's input ``(1, C, H, W)``, and how it was made.

    ``image``: a path, a PIL image, a uint8 ``(C, H, W)`` tensor (preprocessed by ``preprocessing``) or a float
    ``(C, H, W)`` / ``(1, C, H, W)`` tensor, taken as the model's input as it is. ``preprocessing``: a
    :class:`~fxfeat.extraction.preprocess.Preprocessing` (uint8 pixels in), or any callable taking a PIL image
    and returning a float ``(C, H, W)`` tensor (a torchvision transform, a library's own).

    Example:
        >>> x, how = model_input(torch.zeros(3, 300, 200, dtype=torch.uint8), plain_resize((224, 224)), 3)
        >>> tuple(x.shape), how
        ((1, 3, 224, 224), 'a plain resize to 224×224 with ImageNet normalisation')
    """
    image = _opened(image)
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        if image.dim() == 4 and len(image) == 1:
            image = image[0]
        if image.dim() != 3:
            raise InvalidRequestError(f"A float image tensor is (C, H, W) or (1, C, H, W), not "
                                      f"{tuple(image.shape)}.", hint=_IMAGE_HINT + ".")
        return image[None].float(), "the tensor given, as the model's input"
    try:
        pixels = image_tensor(image, channels)
    except (ValueError, TypeError) as error:
        raise InvalidRequestError(f"The image is not one fxfeat can read ({type(image).__name__}: {error}).",
                                  hint=_IMAGE_HINT + ".") from None
    if isinstance(preprocessing, Preprocessing):
        return preprocessing.normalize(preprocessing(pixels)[None]), preprocessing.source
    from torchvision.transforms.v2.functional import to_pil_image

    made = preprocessing(to_pil_image(pixels))
    return made[None].float(), getattr(preprocessing, "source", type(preprocessing).__name__)


def _as_map(tensor: torch.Tensor, level: Level, input_hw: tuple[int, int]) -> torch.Tensor:
    """One sample's output of ``level`` as a ``(C, H, W)`` map: NHWC permuted, a token sequence (NLC) without
    its prefix tokens reshaped to its grid (the input's size over the reduction, else the largest square)."""
    if level.fmt == "NHWC":
        return tensor.permute(2, 0, 1)
    if level.fmt == "NLC":
        tokens = tensor[level.prefix_tokens:]
        grid = [side // level.reduction for side in input_hw] if level.reduction else [0, 0]
        if grid[0] * grid[1] != len(tokens):
            side = int(len(tokens) ** 0.5)
            grid, tokens = [side, side], tokens[len(tokens) - side * side:]
        return tokens.transpose(0, 1).reshape(-1, *grid)
    return tensor


def level_maps(extractor: FeatureGraphModule, x: torch.Tensor, levels: list[Level]) -> list[torch.Tensor]:
    """The ``(C, H, W)`` map of each returned level of ``extractor`` on the input ``x`` (``levels``: the returned
    ones, in output order), run in eval mode without gradients; the extractor's (and its model's) training flags
    are restored."""
    with evaluation_mode(extractor), torch.no_grad():
        outputs = extractor(x)
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    elif isinstance(outputs, torch.Tensor):
        outputs = [outputs]
    return [_as_map(output[0], level, tuple(x.shape[-2:])) for output, level in zip(outputs, levels)
            if output.dim() >= 3]


def principal_rgb(feature_map: torch.Tensor) -> np.ndarray:
    """A ``(C, H, W)`` map's first three principal components over its positions as an ``(H, W, 3)`` RGB array in
    [0, 1] (each component scaled to its range; the sign of each chosen so that its largest weight is positive;
    zeros where the map has fewer than three components: fewer channels or positions, or a lower rank)."""
    channels, height, width = feature_map.shape
    points = feature_map.detach().double().reshape(channels, -1).T
    points = points - points.mean(dim=0)
    _, values, directions = torch.linalg.svd(points, full_matrices=False)
    directions = directions[:3][values[:3] > 1e-9 * values[0].clamp_min(1e-300)]  # rounding noise is no component
    largest = directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))
    components = points @ (directions * largest.sign()).T
    rgb = torch.zeros(height * width, 3, dtype=torch.float64)
    low, high = components.min(dim=0).values, components.max(dim=0).values
    rgb[:, : components.shape[1]] = (components - low) / (high - low).clamp_min(1e-12)
    return rgb.reshape(height, width, 3).numpy()


def _shown(x: torch.Tensor) -> np.ndarray:
    """The model's input as an image: each channel scaled to [0, 1] (gray as RGB)."""
    image = x[0].double()
    low = image.amin(dim=(1, 2), keepdim=True)
    image = (image - low) / (image.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
    return (image if len(image) == 3 else image[:1].expand(3, -1, -1)).permute(1, 2, 0).numpy()


def maps_size(count: int) -> tuple[float, float]:
    """The width and height in inches :func:`draw_maps` wants for ``count`` maps."""
    return (count + 1) * _PANEL_INCHES, _PANEL_INCHES + 1.0


def draw_maps(figure, x: torch.Tensor, maps: list[torch.Tensor], levels: list[Level], how: str) -> None:
    """Draw the input ``x`` and each level's map (PCA to RGB) side by side on ``figure`` (a ``Figure`` or
    ``SubFigure``); the panels are ``figure.axes`` in that order, each with one image (``axes.images[0]``)."""
    panels = figure.subplots(1, len(maps) + 1, squeeze=False)[0]
    panels[0].imshow(_shown(x), interpolation="nearest")
    panels[0].set_title(f"input {x.shape[-2]}×{x.shape[-1]}", fontsize=8)
    for axes, feature_map, level in zip(panels[1:], maps, levels):
        axes.imshow(principal_rgb(feature_map), interpolation="nearest")
        axes.set_title(f"#{level.index} {level.module}\n{feature_map.shape[1]}×{feature_map.shape[2]} · "
                       f"{feature_map.shape[0]} ch", fontsize=7)
    for axes in panels:
        axes.set_axis_off()
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.03, top=0.78, wspace=0.08)
    figure.suptitle(f"Each level's first 3 principal components as RGB; preprocessing: {how}", fontsize=8, y=0.98)
