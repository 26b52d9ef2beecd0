"""Sums and products that write into their first operand where that gives the same tensor: what the in-place
inference pass (:mod:`fxfeat.passes.in_place`) puts in an extractor's graph."""

from __future__ import annotations

import torch
import torch.fx as fx

__all__ = ["add_in_place", "mul_in_place"]


def _fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a op b`` has ``a``'s shape, dtype and device, so that writing it into ``a`` changes nothing.
    (Broadcasting by hand: ``torch.broadcast_shapes`` costs more than a small addition.)"""
    if a.dtype != b.dtype or a.device != b.device or b.dim() > a.dim():
        return False
    return a.shape == b.shape or all(m == 1 or m == n for m, n in zip(reversed(b.shape), reversed(a.shape)))


@fx.wrap
def add_in_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, written into ``a`` when that gives the same tensor (``a`` has the sum's shape and dtype)."""
    return a.add_(b) if _fits(a, b) else a + b


@fx.wrap
def mul_in_place(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a * b``, written into ``a`` when that gives the same tensor (``a`` has the product's shape and dtype)."""
    return a.mul_(b) if _fits(a, b) else a * b
