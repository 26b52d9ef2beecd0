"""Shared checks for the test suite: eager references and feature_info against real outputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fxfeat
from benchmarks.references import as_list, eager_references, same_layout

__all__ = ["as_list", "assert_bit_equal_to_eager", "assert_feature_info_matches", "with_zoo"]


def assert_bit_equal_to_eager(model: nn.Module, extractor: nn.Module, x: torch.Tensor) -> None:
    """Every output of ``extractor`` equals (torch.equal) the eager model's tensor for that level."""
    model.eval()
    extractor.eval()
    with torch.no_grad():
        outputs = as_list(extractor(x))
    references = eager_references(model, extractor.feature_info, x)
    assert len(outputs) == len(references)
    for entry, output, reference in zip(extractor.feature_info.get_dicts(), outputs, references):
        reference = same_layout(reference, output)
        assert torch.equal(output, reference), f"level {entry['index']} ({entry['module'] or entry['node']}) differs"


def assert_feature_info_matches(extractor: nn.Module, x: torch.Tensor, slack: int = 1) -> None:
    """Channels equal, and each spatial size within ``slack`` of ceil(input / reduction)."""
    extractor.eval()
    with torch.no_grad():
        outputs = as_list(extractor(x))
    info = extractor.feature_info
    assert len(outputs) == len(info.out_indices)
    height, width = x.shape[-2:]
    for entry, output in zip(info.get_dicts(), outputs):
        assert entry["fmt"] == "NCHW" and output.dim() == 4, entry
        assert output.shape[1] == entry["num_chs"], (entry, tuple(output.shape))
        reduction = entry["reduction"]
        for size, full in zip(output.shape[-2:], (height, width)):
            expected = math.ceil(full / reduction)
            assert expected - slack <= size <= expected, (entry, tuple(output.shape), (height, width))


def with_zoo(default, zoo) -> list:
    """Parameters for a test run on ``default`` in ``make test`` and on ``zoo`` too, marked ``zoo``, in
    ``make test-zoo``."""
    return [*default, *(pytest.param(case, marks=pytest.mark.zoo) for case in zoo)]


def raises_fxfeat_error(error_type, fn, *args, **kwargs) -> str:
    """Call ``fn``; it must raise ``error_type``, an ``FxFeatError`` with a hint. Returns the message."""
    with pytest.raises(error_type) as caught:
        fn(*args, **kwargs)
    assert isinstance(caught.value, fxfeat.FxFeatError)
    text = str(caught.value)
    assert "Hint:" in text
    return text
