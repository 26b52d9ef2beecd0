"""The picture of the levels: the model as one strip from input to output, resolution drawn as height.

Boxes from left to right: the input; each returned level (index and module above it; node, reduction, H x W at
the probe size, channels, parameters kept and the candidates it was chosen over below it); runs of levels the
extractor does not return at one reduction, rolled up into one grey box (``x21``); then the head: ``unpooled`` ->
the global pool -> ``pooled`` -> the final linear maps -> the model's vector. A box's height grows with its map's
side (``log2`` of the input side over the reduction); vectors are flat. Every text is drawn by
:func:`draw_levels` from a :class:`~fxfeat.drawing.summary.Summary`; each text artist has a ``gid`` (kept as the
``id`` of its group in an SVG): ``<box>-title`` above a box and ``<box>-details`` below it, where ``<box>`` is
``input``, ``level-<index>`` (a returned level), ``rolled-<first index>`` or ``head-<kind>``; ``head-pool`` and
``head-linear`` on the arrows of the head; ``title`` at the top.

Example:
    >>> import torchvision
    >>> from matplotlib.figure import Figure
    >>> from fxfeat.drawing.summary import summarise_model
    >>> summary, _ = summarise_model(torchvision.models.resnet18())
    >>> figure = Figure()
    >>> draw_levels(figure, summary)
    >>> [text.get_text() for text in figure.axes[0].texts if text.get_gid() == "level-3-details"]
    ['node layer3_1_relu_1\\nreduction 16\\n14×14\\n256 ch\\n2.78M params\\nover layer3_0_relu_1']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxfeat.drawing.summary import HeadStep, Level, Summary, spatial_size

__all__ = ["draw_levels", "format_count", "size_text"]

_LEVEL_WIDTH, _ROLLED_WIDTH, _VECTOR_WIDTH, _OP_WIDTH, _GAP = 2.8, 1.4, 1.4, 1.6, 0.7
_TALLEST = 3.0            # the input's box; each halving of the resolution takes _STEP off
_STEP, _FLAT = 0.42, 0.3
_TOP, _BOTTOM = _TALLEST / 2 + 0.25, -_TALLEST / 2 - 0.25   # where the texts above and below the boxes start
_INCH_PER_UNIT = 0.62
_LOWEST, _HIGHEST, _AXES_HEIGHT = -4.4, 2.6, 0.9   # the strip's extent in units, the axes' share of the height
_MAX_CANDIDATES = 3
_COLOURS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#dd8452")


@dataclass(frozen=True)
class _Item:
    """One place on the strip: a box (or an operation's label) and its texts."""

    width: float
    height: float
    title: str
    details: str
    gid: str
    colour: str | None      # None: an operation, drawn as text on the arrow's path
    faded: bool = False


def format_count(count: int) -> str:
    """A parameter count as drawn: ``11.18M``, ``8.4k``, ``0``.

    Example:
        >>> format_count(11_176_512), format_count(8_448), format_count(0)
        ('11.18M', '8.4k', '0')
    """
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    return f"{count / 1e3:.1f}k" if count >= 1000 else str(count)


def size_text(shape: tuple[int, ...] | None, fmt: str) -> str:
    """A level's size as drawn: ``H×W`` of a map, ``L tokens`` of a token sequence, ``?`` unknown.

    Example:
        >>> size_text((64, 56, 56), "NCHW"), size_text((197, 192), "NLC"), size_text(None, "NCHW")
        ('56×56', '197 tokens', '?')
    """
    spatial = spatial_size(shape, fmt)
    if spatial is not None:
        return f"{spatial[0]}×{spatial[1]}"
    return f"{shape[0]} tokens" if shape is not None and len(shape) == 2 else "?"


def _height(reduction: int | None) -> float:
    if reduction is None:
        return _FLAT
    return max(_TALLEST - _STEP * math.log2(reduction), _FLAT + 0.1)


def _colour(reduction: int | None) -> str:
    return _COLOURS[int(math.log2(reduction)) % len(_COLOURS)] if reduction else "#999999"


def _level_item(level: Level) -> _Item:
    lines = [f"node {level.node}", f"reduction {level.reduction}", size_text(level.shape, level.fmt),
             f"{level.channels} ch"]
    if level.parameters is not None:
        lines.append(f"{format_count(level.parameters)} params")
    if level.candidates:
        more = len(level.candidates) - _MAX_CANDIDATES
        lines.append("over " + "\n".join(level.candidates[:_MAX_CANDIDATES]) + (f"\n+{more} more" if more > 0 else ""))
    return _Item(_LEVEL_WIDTH, _height(level.reduction), f"#{level.index}\n{level.module or '-'}", "\n".join(lines),
                 f"level-{level.index}", _colour(level.reduction))


def _rolled_item(run: list[Level]) -> _Item:
    first, last = run[0], run[-1]
    if len(run) == 1:
        title, details = f"#{first.index}\n{first.module or '-'}", ""
    else:
        title, details = f"#{first.index}–{last.index}\n×{len(run)}", f"{first.module} …\n{last.module}\n"
    return _Item(_ROLLED_WIDTH, _height(first.reduction), title, f"{details}reduction {first.reduction}\nnot returned",
                 f"rolled-{first.index}", "#dddddd", faded=True)


def _level_items(levels: tuple[Level, ...]) -> list[_Item]:
    """Returned levels one box each; runs of the others at one reduction rolled up into one box."""
    items, run = [], []
    for level in levels:
        if run and (level.returned or level.reduction != run[-1].reduction):
            items.append(_rolled_item(run))
            run = []
        if level.returned:
            items.append(_level_item(level))
        else:
            run.append(level)
    if run:
        items.append(_rolled_item(run))
    return items


def _head_item(step: HeadStep) -> _Item:
    is_map = step.shape is not None and len(step.shape) > 1
    if is_map:
        channels = step.shape[-1] if step.fmt in ("NHWC", "NLC") else step.shape[0]
        sizes = [f"reduction {step.reduction}", size_text(step.shape, step.fmt), f"{channels} ch"]
    else:
        sizes = [f"{step.shape[0]} features"] if step.shape is not None else []
    lines = [f"node {step.node}", *sizes]
    return _Item(_LEVEL_WIDTH if is_map else _VECTOR_WIDTH, _height(step.reduction) if is_map else _FLAT,
                 f"{step.kind}\n{step.module or '-'}", "\n".join(lines), f"head-{step.kind}", "#f0a35e")


def _head_items(summary: Summary) -> list[_Item]:
    items = []
    for step in summary.head:
        if step.kind == "pooled" and summary.global_pool:
            items.append(_Item(_OP_WIDTH, 0, "global pool", summary.global_pool, "head-pool", None))
        if step.kind in ("embedding", "logits") and summary.linear:
            items.append(_Item(_OP_WIDTH, 0, "linear", "\n".join(summary.linear), "head-linear", None))
        items.append(_head_item(step))
    return items


def _title(summary: Summary) -> str:
    origin = {"declared": "declared by the model", "discovered": "discovered from the graph",
              "user": "chosen by the user", "feature_info": "from the extractor's feature_info"}[summary.source]
    size = "×".join(map(str, summary.input_size)) if summary.input_size else "?"
    parts = [f"{summary.model_name}: {len(summary.levels)} levels ({origin}) at input {size}",
             f"out_indices={summary.out_indices}"]
    if summary.output_stride is not None:
        parts.append(f"output_stride={summary.output_stride}")
    if summary.total_parameters is not None:
        parts.append(f"{format_count(summary.total_parameters)} params in the model")
    else:
        parts.append("pass the model for the parameters and candidates of each level")
    return " · ".join(parts)


def _font_size(text: str, width: float, largest: float) -> float:
    """A font size at which ``text``'s longest line fits ``width`` units (about 0.55 em per character)."""
    longest = max(len(line) for line in text.splitlines()) if text else 1
    return max(min(largest, width * _INCH_PER_UNIT * 72 / (0.55 * longest)), 4.5)


def strip_size(summary: Summary) -> tuple[float, float]:
    """The width and height in inches :func:`draw_levels` wants for ``summary``."""
    items = _items(summary)
    width = sum(item.width for item in items) + _GAP * (len(items) + 1)
    return width * _INCH_PER_UNIT, (_HIGHEST - _LOWEST) * _INCH_PER_UNIT / _AXES_HEIGHT


def _items(summary: Summary) -> list[_Item]:
    size = summary.input_size
    input_item = _Item(_VECTOR_WIDTH, _TALLEST, "input", "×".join(map(str, size)) if size else "?", "input",
                       "#ffffff")
    return [input_item, *_level_items(summary.levels), *_head_items(summary)]


def draw_levels(figure, summary: Summary) -> None:
    """Draw ``summary`` as a strip on ``figure`` (a matplotlib ``Figure`` or ``SubFigure``), on one new axes."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    items = _items(summary)
    width = sum(item.width for item in items) + _GAP * (len(items) + 1)
    axes = figure.add_axes((0, 0, 1, _AXES_HEIGHT))
    axes.set_xlim(0, width)
    axes.set_ylim(_LOWEST, _HIGHEST)
    axes.set_axis_off()
    figure.text(0.01, 0.97, _title(summary), fontsize=9, va="top", gid="title")
    x = _GAP
    for number, item in enumerate(items):
        centre = x + item.width / 2
        if item.colour is None:
            axes.text(centre, 0, f"{item.title}\n{item.details}", ha="center", va="center", style="italic",
                      fontsize=_font_size(item.details, item.width, 7), gid=item.gid)
        else:
            axes.add_patch(Rectangle((x, -item.height / 2), item.width, item.height, facecolor=item.colour,
                                     edgecolor="#444444", alpha=0.5 if item.faded else 0.85, linewidth=0.8))
            axes.text(centre, _TOP, item.title, ha="center", va="bottom", fontsize=_font_size(item.title,
                      item.width, 8), weight="bold", color="#777777" if item.faded else "black",
                      gid=f"{item.gid}-title")
            axes.text(centre, _BOTTOM, item.details, ha="center", va="top",
                      fontsize=_font_size(item.details, item.width, 7), color="#777777" if item.faded else "black",
                      gid=f"{item.gid}-details")
        if number + 1 < len(items):
            axes.add_patch(FancyArrowPatch((x + item.width + 0.08, 0), (x + item.width + _GAP - 0.08, 0),
                                           arrowstyle="-|>", mutation_scale=8, color="#444444", linewidth=0.8))
        x += item.width + _GAP
