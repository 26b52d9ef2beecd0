"""Test configuration: deterministic, single-threaded-friendly defaults and model builders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxfeat.cli import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def timm_model(name: str, **kwargs):
    """A timm model with random weights, in eval mode."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def torchvision_model(name: str, **kwargs):
    """A torchvision model with random weights, in eval mode."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


__all__ = ["build_model", "timm_model", "torchvision_model"]
