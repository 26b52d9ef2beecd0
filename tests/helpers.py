"""Shared checks for the test suite: eager references and feature_info against real outputs."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn

from fxfeat.trace import trace_model


def as_list(outputs) -> list[torch.Tensor]:
    return list(outputs.values()) if isinstance(outputs, dict) else list(outputs)


def _interpreter_values(model: nn.Module, nodes: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Values of ``nodes`` in an interpreter run of an unmodified trace of ``model``."""
    traced = trace_model(model)
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in nodes:
                values[n.name] = result
            return result

    Recorder(traced.graph_module).run(x)
    return values


def eager_references(model: nn.Module, feature_info, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the unmodified model computes for each returned level, in output order.

    A forward hook on the level's module gives the eager value; a module called more than once (or a level
    that is not a module output) falls back to an interpreter run of an unmodified trace.
    """
    entries = feature_info.get_dicts()
    records: dict[str, list[torch.Tensor]] = defaultdict(list)
    handles = []
    for path in {entry["module"] for entry in entries if entry["module"]}:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda m, i, o, path=path: records[path].append(o)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    missing = [e["node"] for e in entries if not e["module"] or len(records[e["module"]]) != 1]
    with torch.no_grad():
        fallback = _interpreter_values(model, missing, x) if missing else {}
    references = []
    for entry in entries:
        value = fallback.get(entry["node"]) if entry["node"] in missing else records[entry["module"]][0]
        references.append(value)
    return references


def to_returned_layout(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """The reference in the layout the extractor returns (NHWC maps are returned as NCHW by default)."""
    if reference.shape != output.shape and reference.dim() == 4:
        permuted = reference.permute(0, 3, 1, 2)
        if permuted.shape == output.shape:
            return permuted
    return reference


def assert_bit_equal_to_eager(model: nn.Module, extractor: nn.Module, x: torch.Tensor) -> None:
    """Every output of ``extractor`` equals (torch.equal) the eager model's tensor for that level."""
    model.eval()
    extractor.eval()
    with torch.no_grad():
        outputs = as_list(extractor(x))
    references = eager_references(model, extractor.feature_info, x)
    assert len(outputs) == len(references)
    for entry, output, reference in zip(extractor.feature_info.get_dicts(), outputs, references):
        reference = to_returned_layout(reference, output)
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
