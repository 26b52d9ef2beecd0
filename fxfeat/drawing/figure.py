"""``fxfeat.plot``: a model's levels as one picture, and with an image its feature maps below them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from fxfeat.drawing.levels import draw_levels, strip_size
from fxfeat.drawing.maps import draw_maps, level_maps, maps_size, model_input, plain_resize
from fxfeat.drawing.summary import Summary, summarise_extractor, summarise_model
from fxfeat.errors import InvalidRequestError, MissingDependencyError
from fxfeat.extraction.preprocess import resolve_preprocessing
from fxfeat.module import FeatureGraphModule

__all__ = ["plot"]

FORMATS = (".svg", ".png")
# Text stays text in an SVG (the numbers can be read back and searched); a fixed salt and no date make the
# same picture the same file.
_RC = {"svg.fonttype": "none", "svg.hashsalt": "fxfeat", "font.family": "DejaVu Sans"}


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingDependencyError(
            f"fxfeat.plot draws with matplotlib, which is not installed ({error}).",
            hint="pip install 'fxfeat[plot]' (or pip install matplotlib).") from None
    return matplotlib, Figure


def plot(
    model_or_extractor: nn.Module,
    path: str | Path | None = None,
    *,
    image: Any = None,
    levels: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    out_indices: int | tuple[int, ...] | None = None,
    output_stride: int | None = None,
    preprocessing: Callable | None = None,
):
    """Draw a model's levels as one strip from input to output, and with ``image`` its feature maps.

    The strip: the input, each level the extractor returns as a box whose height grows with its resolution
    (index and module above; node, reduction, H x W at the probe size, channels, parameters kept and the
    candidates it was chosen over below), the levels it does not return rolled up (``×21``), then the head:
    ``unpooled`` -> global pool -> ``pooled`` -> final linear maps -> the model's vector. Every number comes from
    ``feature_info`` or ``fxfeat.inspect``'s report. With ``image``, a second row: the image as the model sees it,
    then each returned level's map reduced to three channels by principal component analysis, as RGB at its own
    resolution (token levels as their grids).

    Args:
        model_or_extractor: a model (compiled here as ``fxfeat.compile(model, levels=..., input_size=...,
            out_indices=..., output_stride=...)`` would compile it, and inspected; never modified) or an extractor
            ``fxfeat.compile`` made (drawn from its ``feature_info`` alone: no parameters, candidates, pooling or
            linear maps, which only the model's inspection knows; the other arguments must then be left out).
        path: where to save the picture, ``.svg`` (text kept as text) or ``.png``; ``None``: not saved.
        image: a path, a PIL image, a uint8 ``(C, H, W)`` tensor, or a float ``(C, H, W)`` tensor already
            preprocessed for the model (used as it is).
        levels, input_size, out_indices, output_stride: as for ``fxfeat.compile``.
        preprocessing: how ``image`` becomes the model's input: a
            :class:`~fxfeat.extraction.preprocess.Preprocessing` (``fxfeat.extraction.preprocess.
            resolve_preprocessing(model, input_size, spec="torchvision:NAME")``), or any callable taking a PIL image
            and returning a float ``(C, H, W)`` tensor. Default: the model's own (``resolve_preprocessing`` of the
            model at the compiled size: timm's, open_clip's, Hugging Face's; else ImageNet's defaults); for an
            extractor a plain resize to its input size with ImageNet normalisation. The picture says which.

    Returns:
        The matplotlib ``Figure`` (not registered with ``pyplot``; in a notebook it shows as the cell's value).

    Raises:
        InvalidRequestError: ``path`` is neither ``.svg`` nor ``.png``; ``image`` is missing or unreadable;
            compile arguments given with an extractor.
        MissingDependencyError: matplotlib is not installed (``pip install 'fxfeat[plot]'``).

    Example:
        >>> import torchvision, fxfeat
        >>> figure = fxfeat.plot(torchvision.models.resnet18(), out_indices=(2, 3, 4))
        >>> titles = [text.get_text().replace("\\n", " ") for text in figure.axes[0].texts
        ...           if text.get_gid().endswith("-title")]
        >>> titles[:6]   # levels 0 and 1 are not returned: grey boxes
        ['input', '#0 relu', '#1 layer1', '#2 layer2', '#3 layer3', '#4 layer4']
        >>> titles[6:]
        ['unpooled layer4', 'pooled -', 'embedding fc']
    """
    if path is not None and Path(path).suffix.lower() not in FORMATS:
        raise InvalidRequestError(f"fxfeat.plot writes SVG or PNG files, not {Path(path).suffix or 'no extension'} "
                                  f"({str(path)!r}).", hint="name the file .svg (text kept as text) or .png.")
    matplotlib, Figure = _matplotlib()
    summary, extractor = _summary(model_or_extractor, levels, input_size, out_indices, output_stride)
    with matplotlib.rc_context(_RC):
        width, height = strip_size(summary)
        if image is None:
            figure = Figure(figsize=(width, height))
            draw_levels(figure, summary)
        else:
            figure = _with_maps(Figure, summary, extractor, model_or_extractor, image, preprocessing,
                                (width, height))
        if path is not None:
            figure.savefig(path, metadata={"Date": None} if str(path).lower().endswith(".svg") else None,
                           dpi=150)
    return figure


def _summary(model_or_extractor: nn.Module, levels, input_size, out_indices, output_stride,
             ) -> tuple[Summary, FeatureGraphModule]:
    if not isinstance(model_or_extractor, FeatureGraphModule):
        return summarise_model(model_or_extractor, levels=levels, input_size=input_size, out_indices=out_indices,
                               output_stride=output_stride)
    given = {name: value for name, value in (("levels", levels), ("input_size", input_size),
             ("out_indices", out_indices), ("output_stride", output_stride)) if value is not None}
    if given:
        raise InvalidRequestError(
            f"fxfeat.plot draws an extractor as it was compiled; it cannot apply {', '.join(given)} to it.",
            hint="pass the model instead (fxfeat.plot(model, ...) compiles it with these arguments), or compile "
            "the extractor with them.")
    return summarise_extractor(model_or_extractor), model_or_extractor


def _with_maps(Figure, summary: Summary, extractor: FeatureGraphModule, given: nn.Module, image: Any,
               preprocessing: Callable | None, strip: tuple[float, float]):
    """The strip above the image and its maps."""
    channels, height, width = summary.input_size or (3, 224, 224)
    if preprocessing is None:
        preprocessing = plain_resize((height, width), channels) if given is extractor else resolve_preprocessing(
            given, (channels, height, width))
    x, how = model_input(image, preprocessing, channels)
    returned = [next(level for level in summary.levels if level.index == index) for index in summary.out_indices
                if any(level.index == index for level in summary.levels)]
    maps = level_maps(extractor, x, returned)
    if not maps:
        raise InvalidRequestError(f"{summary.model_name} returns no feature map to draw on the image "
                                  f"(out_indices {summary.out_indices}).",
                                  hint="pass the model, or an extractor compiled with mode='features'.")
    below = maps_size(len(maps))
    figure = Figure(figsize=(max(strip[0], below[0]), strip[1] + below[1]))
    top, bottom = figure.subfigures(2, 1, height_ratios=(strip[1], below[1]))
    draw_levels(top, summary)
    draw_maps(bottom, x, maps, returned[: len(maps)], how)
    return figure
