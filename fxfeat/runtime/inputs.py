"""The conversion an optimised extractor applies to its input (:mod:`fxfeat.passes.convert_layout`)."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["prepare_input"]


@fx.wrap
def prepare_input(x: torch.Tensor, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """The input as the optimised graph computes: in ``dtype``, channels-last (4D inputs)."""
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x if dtype is None else x.to(dtype)
