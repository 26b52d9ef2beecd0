"""``fxfeat.backbone``: an extractor ready for torchvision's detection models, with or without an FPN.

torchvision's ``FasterRCNN``, ``RetinaNet``, ``MaskRCNN`` and ``FCOS`` take any backbone that returns an
``OrderedDict`` of maps and has an ``out_channels`` attribute. :func:`backbone` compiles the model and, with
``fpn_channels``, puts torchvision's ``FeaturePyramidNetwork`` on the levels, sized from ``feature_info``, with
the extra max-pooled level torchvision's detectors expect (as its ``BackboneWithFPN``). Maps are keyed ``"0"``,
``"1"``... in level order (and ``"pool"``), the names the detectors' default RoI poolers read.

Example:
    >>> import torch, torchvision, fxfeat
    >>> from torchvision.models.detection import FasterRCNN
    >>> body = fxfeat.backbone(torchvision.models.resnet18(), fpn_channels=64)
    >>> body.out_channels, body.feature_info.reduction()
    (64, [4, 8, 16, 32])
    >>> [tuple(m.shape[1:]) for m in body(torch.randn(1, 3, 64, 64)).values()]
    [(64, 16, 16), (64, 8, 8), (64, 4, 4), (64, 2, 2), (64, 1, 1)]
    >>> detector = FasterRCNN(body, num_classes=3, min_size=128, max_size=160).eval()
    >>> sorted(detector([torch.rand(3, 120, 150)])[0])
    ['boxes', 'labels', 'scores']
"""

from __future__ import annotations

import numbers
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from fxfeat.api import compile as compile_model
from fxfeat.errors import InvalidRequestError, OutIndicesError
from fxfeat.feature_info import FeatureInfo
from fxfeat.module import FeatureGraphModule

__all__ = ["Backbone", "backbone"]

FPN_LEVELS = 4  # torchvision's FPN backbones take the last four stages (its returned_layers=[1, 2, 3, 4])
_DEFAULT = object()


class Backbone(nn.Module):
    """An extractor returning an ``OrderedDict`` of maps, optionally through a feature pyramid network.

    Attributes:
        body: the :class:`~fxfeat.FeatureGraphModule` (freeze its first levels with ``fxfeat.freeze(body, ...)``).
        fpn: torchvision's ``FeaturePyramidNetwork`` on the body's maps, or ``None``.
        out_channels: channels of every returned map (an int: what torchvision's detectors read), or the list of
            each map's channels when there is no FPN and they differ.
        feature_info: the body's ``feature_info``.
    """

    def __init__(self, body: FeatureGraphModule, fpn: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.fpn = fpn
        if fpn is not None:
            self.out_channels = fpn.inner_blocks[0][0].out_channels
        else:
            channels = body.feature_info.channels()
            self.out_channels = channels[0] if len(set(channels)) == 1 else channels

    @property
    def feature_info(self) -> FeatureInfo:
        return self.body.feature_info

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)  # a list; a dict or one tensor when the body was compiled to return one
        if isinstance(features, dict):
            features = list(features.values())
        elif isinstance(features, torch.Tensor):
            features = [features]
        maps = OrderedDict((str(index), value) for index, value in enumerate(features))
        return self.fpn(maps) if self.fpn is not None else maps


def backbone(
    model: nn.Module,
    *,
    out_indices: int | tuple[int, ...] | None = None,
    fpn_channels: int | None = None,
    extra_blocks: ExtraFPNBlock | None = _DEFAULT,
    **compile_kwargs,
) -> Backbone:
    """Compile ``model`` into a detection backbone.

    Args:
        model: any model :func:`fxfeat.compile` takes, or an extractor it made (then no ``compile_kwargs``).
        out_indices: the levels, as in :func:`fxfeat.compile`. Default: the last four with ``fpn_channels`` (fewer
            if the model has fewer), else the last one (one map, so ``out_channels`` is an int).
        fpn_channels: channels of a ``FeaturePyramidNetwork`` on the levels; ``None``: no FPN.
        extra_blocks: the FPN's extra levels; default torchvision's ``LastLevelMaxPool`` (the ``"pool"`` map its
            anchor generators and RoI heads expect); ``LastLevelP6P7(c, c)`` as in RetinaNet; ``None``: none.
        compile_kwargs: other :func:`fxfeat.compile` arguments (``output_stride``, ``levels``, ``input_size``...).

    Raises:
        InvalidRequestError: ``mode`` or ``return_dict`` given (a backbone returns the feature maps as a dict),
            arguments with an already compiled extractor, or ``fpn_channels`` not a positive int.
    """
    for fixed in ("mode", "return_dict", "num_classes"):
        if fixed in compile_kwargs:
            raise InvalidRequestError(
                f"fxfeat.backbone returns the feature maps as an OrderedDict; {fixed}= does not apply.",
                hint=f"leave out {fixed}=, or use fxfeat.compile for other outputs.")
    if fpn_channels is not None and (isinstance(fpn_channels, bool) or not isinstance(fpn_channels, numbers.Integral)
                                     or fpn_channels <= 0):
        raise InvalidRequestError(
            f"fpn_channels must be None or a positive int (the channels of every FPN output); got {fpn_channels!r}.",
            hint="e.g. fpn_channels=256, as torchvision's detection backbones; None for no FPN.")
    if isinstance(model, FeatureGraphModule):
        if compile_kwargs or out_indices is not None:
            raise InvalidRequestError(
                "fxfeat.backbone got an extractor already compiled, with compile arguments.",
                hint="pass the model with the arguments, or the extractor alone.")
        body = model
    elif out_indices is not None or fpn_channels is None:
        body = compile_model(model, out_indices=1 if out_indices is None else out_indices, **compile_kwargs)
    else:
        try:  # the last FPN_LEVELS levels, in one compile when the model has that many
            body = compile_model(model, out_indices=tuple(range(-FPN_LEVELS, 0)), **compile_kwargs)
        except OutIndicesError:
            body = compile_model(model, out_indices=None, **compile_kwargs)
    if fpn_channels is None:
        return Backbone(body)
    channels = body.feature_info.channels()
    extra = LastLevelMaxPool() if extra_blocks is _DEFAULT else extra_blocks
    return Backbone(body, FeaturePyramidNetwork(channels, int(fpn_channels), extra_blocks=extra))
