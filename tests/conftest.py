"""Test configuration: deterministic, single-threaded-friendly defaults and model builders."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fxfeat.models import build_model


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def timm_model(name: str, **kwargs):
    """A timm model with random weights (seed 0), in eval mode."""
    return build_model(f"timm:{name}", **kwargs)


def torchvision_model(name: str, **kwargs):
    """A torchvision model with random weights (seed 0), in eval mode."""
    return build_model(f"torchvision:{name}", **kwargs)


__all__ = ["build_model", "timm_model", "torchvision_model"]


@pytest.fixture(scope="module")
def resnet18():
    """torchvision's resnet18 in eval mode, random weights; one per test module."""
    return torchvision_model("resnet18")
