"""What every export format shares: the example input and the dims that may change, the parity check of an
exported artefact against the eager extractor (:func:`close`), the report, and the errors naming the node an
exporter failed at.

Example:
    >>> import torch
    >>> close(torch.tensor([100.0, 0.01]), torch.tensor([100.0, 0.0]))
    True
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxfeat.errors import ExportError, FxFeatWarning, InvalidRequestError
from fxfeat.module import FeatureGraphModule
from fxfeat.optimize import InferenceGraphModule
from fxfeat.plan import names
from fxfeat.trace import DEFAULT_INPUT_SIZE, evaluation_mode
from fxfeat.trace.metadata import output_node
from fxfeat.trace.values import example_batch

__all__ = [
    "ATOL", "AXES", "ExportReport", "FEATURE_INFO_FILE", "ParityCheck", "ProbedInputs", "RTOL", "close", "compare",
    "export_error", "flat_outputs", "in_eval_mode", "most_dynamic", "output_names", "probe_inputs",
    "refuse_optimized",
]

RTOL, ATOL = 1e-4, 1e-5  # exported against eager, fp32 (see close())
FEATURE_INFO_FILE = "fxfeat_feature_info.json"
EXAMPLE_BATCH, OTHER_BATCH = 2, 3  # torch.export specialises sizes 0 and 1: the example batch must be larger
OTHER_SIZE = (32, 64)  # added to the height and width for the second parity check


AXES = {"batch": 0, "height": 2, "width": 3}  # input dims by name


@dataclass(frozen=True)
class ParityCheck:
    """One run of the exported artefact against the eager extractor.

    Attributes:
        input_shape: the input batch's shape.
        max_abs_error: the largest absolute difference over every output.
    """

    input_shape: tuple[int, ...]
    max_abs_error: float


@dataclass(frozen=True)
class ExportReport:
    """What an export produced and how it was checked.

    Attributes:
        format: ``"torchscript"``, ``"onnx"`` or ``"exported_program"``.
        exporter: the exporter that produced it (``"script"``/``"trace"``, ``"dynamo"``/``"torchscript"`` for ONNX,
            ``"torch.export"``).
        output_names: the outputs, in order (the levels' names).
        dynamic: the input dimensions that may change (``"batch"``, ``"height"``, ``"width"``).
        checks: the parity checks run.
        path: the saved file, if any.
        notes: what the export had to give up, and the exporters tried before the one that worked.
        data_path: the file beside ``path`` holding the weights as ONNX external data (``model.onnx.data``), if
            they are not in ``path`` itself (over protobuf's 2 GiB, or ``external_data=True``); the two travel
            together.
    """

    format: str
    exporter: str
    output_names: tuple[str, ...]
    dynamic: tuple[str, ...]
    checks: tuple[ParityCheck, ...]
    path: str | None = None
    notes: tuple[str, ...] = ()
    data_path: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.format} ({self.exporter})" + (f" -> {self.path}" if self.path else "")
                 + (f" (weights in {self.data_path})" if self.data_path else ""),
                 f"  dynamic input dims: {', '.join(self.dynamic) or 'none'}"]
        lines += [f"  parity vs eager at {tuple(c.input_shape)}: max abs error {c.max_abs_error:.3g} "
                  f"(tolerance: rtol {RTOL}, atol {ATOL} + {RTOL} x max |output|)" for c in self.checks]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def output_names(extractor: FeatureGraphModule) -> list[str]:
    """Names of the extractor's outputs in order, by the rule of ``return_dict`` keys and extraction folders
    (:mod:`fxfeat.plan.names`): the dict keys if it returns a dict, else each level's head feature, module path
    or node name.

    Example:
        >>> import torchvision, fxfeat
        >>> output_names(fxfeat.compile(torchvision.models.resnet18(), out_indices=(1, 2)))
        ['layer1', 'layer2']
    """
    entries = extractor.feature_info.get_dicts()
    keys = returned_keys(extractor) or [names.entry_label(entry) for entry in entries]
    return names.output_names(keys, fallbacks=[entry["node"] for entry in entries])


def returned_keys(extractor: FeatureGraphModule) -> list[str] | None:
    output = output_node(extractor.graph)
    returned = output.args[0]
    return list(returned) if isinstance(returned, dict) else None


def flat_outputs(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs)


@contextlib.contextmanager
def in_eval_mode(extractor: nn.Module) -> Iterator[None]:
    """Exports are inference graphs: the extractor is in eval mode for the duration, then every module's flag
    is as it was (the modules are the model's, whose flags may differ from one another)."""
    try:
        with evaluation_mode(extractor):
            yield
    finally:
        if isinstance(extractor, FeatureGraphModule):
            extractor.use_mode_graph()  # flags were set back without train(): the graph follows


@dataclass(frozen=True)
class ProbedInputs:
    example: torch.Tensor
    others: dict[tuple[str, ...], torch.Tensor]  # an input changing those dims, where the extractor accepts it
    notes: tuple[str, ...]

    @property
    def dynamic(self) -> tuple[str, ...]:
        return tuple(dim for dims in self.others for dim in dims)

    def checked(self, dims: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The example and the inputs that change only ``dims``."""
        return (self.example, *(x for changed, x in self.others.items() if set(changed) <= set(dims)))


def probe_inputs(extractor: FeatureGraphModule, input_size: tuple[int, int, int] | None, dynamic: bool) -> ProbedInputs:
    """The example input, and which dims may change: each is tried on the eager extractor."""
    if not isinstance(extractor, FeatureGraphModule):
        raise InvalidRequestError(
            f"Only extractors made by fxfeat.compile can be exported; got {type(extractor).__name__}.",
            hint="call fxfeat.compile(model, ...) first and export what it returns.",
        )
    size = tuple(input_size or extractor.input_size or DEFAULT_INPUT_SIZE)
    example = example_batch(extractor, size, EXAMPLE_BATCH)
    if not dynamic:
        return ProbedInputs(example, {}, ())
    channels, height, width = size
    trials = {
        ("batch",): example_batch(extractor, size, OTHER_BATCH),
        ("height", "width"): example_batch(extractor, (channels, height + OTHER_SIZE[0], width + OTHER_SIZE[1])),
    }
    accepted, notes = {}, []
    for dims, other in trials.items():
        try:
            with in_eval_mode(extractor), torch.no_grad():
                extractor.run_quietly(other)
            accepted[dims] = other
        except Exception as error:
            notes.append(f"{' and '.join(dims)} fixed: the extractor does not run at input {tuple(other.shape)} "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    for note in notes:
        warnings.warn(f"export: {note}", FxFeatWarning, stacklevel=3)
    return ProbedInputs(example, accepted, tuple(notes))


def most_dynamic(inputs: ProbedInputs, attempt
                 ) -> tuple[Any, tuple[ParityCheck, ...], tuple[str, ...], tuple[str, ...]]:
    """``attempt(dims)`` (export with those input dims dynamic and check it, raising ``ExportError``) with every
    dynamic dim first, then with the height and width fixed, then with nothing dynamic: where an exporter
    specialises a size (Python on shapes inside a leaf function), the artefact is valid at the example's size.
    Returns the artefact, its checks, the dynamic dims and notes on what was given up."""
    tries = [inputs.dynamic]
    if "height" in inputs.dynamic:
        tries.append(tuple(dim for dim in inputs.dynamic if dim == "batch"))
    if tries[-1]:
        tries.append(())
    errors: list[ExportError] = []
    for dims in tries:
        try:
            artefact, checks = attempt(dims)
        except ExportError as error:
            errors.append(error)
            continue
        notes = list(inputs.notes)
        if errors:
            fixed = [dim for dim in inputs.dynamic if dim not in dims]
            notes.append(f"{' and '.join(fixed)} fixed to the example's: with them dynamic, "
                         f"{str(errors[0]).split(chr(10))[0]}")
            warnings.warn(f"export: {notes[-1]}", FxFeatWarning, stacklevel=3)
        return artefact, checks, dims, tuple(notes)
    raise errors[-1]  # even with every size fixed: the reason is not the dynamic dims


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """The parity criterion: ``allclose`` at ``rtol=1e-4`` with an absolute tolerance of ``1e-5`` plus ``1e-4``
    times the output's largest magnitude, so that values near zero in a map of large values are judged on the
    map's scale (ONNX Runtime's kernels sum in another order than PyTorch's).

    Example:
        >>> close(torch.tensor([100.0, 0.01]), torch.tensor([100.0, 0.0]))
        True
        >>> close(torch.tensor([1.0, 0.5]), torch.tensor([1.0, 0.4]))
        False
    """
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return torch.allclose(actual, expected, rtol=RTOL, atol=ATOL + RTOL * scale)


def compare(extractor: nn.Module, run, inputs: tuple[torch.Tensor, ...], what: str) -> tuple[ParityCheck, ...]:
    """Run ``run`` (the exported artefact, as a function of one input returning a flat list) against eager."""
    checks = []
    for x in inputs:
        with torch.no_grad():
            expected = flat_outputs(extractor(x))
        try:
            actual = run(x)
        except Exception as error:
            raise export_error(extractor, what, error, f"running it on an input of shape {tuple(x.shape)}") from error
        if len(actual) != len(expected):
            raise ExportError(f"{what}: returns {len(actual)} outputs where the extractor returns {len(expected)}.",
                              hint="please report it with the model and the export arguments.")
        error = 0.0
        for index, (want, got) in enumerate(zip(expected, actual)):
            got = torch.as_tensor(got)
            if got.shape != want.shape or not close(got, want):
                difference = "shape " + str(tuple(got.shape)) if got.shape != want.shape else \
                    f"max abs error {(got - want).abs().max().item():.3g}"
                raise ExportError(
                    f"{what}: output {index} differs from the eager extractor at input {tuple(x.shape)} "
                    f"({difference}, expected shape {tuple(want.shape)}).",
                    hint="the exporter may have fixed a size or a branch at the example; try dynamic=False, "
                    "another input_size, or another format.",
                )
            if got.numel():
                error = max(error, (got - want).abs().max().item())
        checks.append(ParityCheck(tuple(x.shape), error))
    return tuple(checks)


def refuse_optimized(extractor: nn.Module, what: str) -> None:
    """An extractor ``optimize_for_inference`` rewrote holds CPU kernels (oneDNN layers with weight caches) that
    TorchScript and ONNX cannot express; the extractor itself exports, and the runtimes optimise on their own."""
    if isinstance(extractor, InferenceGraphModule):
        raise ExportError(
            f"{what} cannot export a module optimize_for_inference returned: its oneDNN layers and in-place "
            "helpers are CPU kernels and Python caches, not TorchScript or ONNX operators",
            hint="export the extractor fxfeat.compile returned; ONNX Runtime and TorchScript's own "
                 "optimize_for_inference fold and fuse it for their runtime",
        )


def export_error(extractor: nn.Module, what: str, error: Exception, doing: str = "exporting") -> ExportError:
    """An ``ExportError`` naming the extractor's node whose name or op the exporter's message mentions."""
    message = str(error).strip()
    named = []
    for node in extractor.graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        op = target.split(".")[-1].split("::")[-1]
        # The op as exporters qualify it (aten::op, aten.op.default, namespace::op), not a bare word.
        if node.op == "call_function" and re.search(rf"[:.]{re.escape(op)}\b", message):
            named.append(f"{node.name} ({target})")
    where = f" at node {named[0]}" if named else ""
    first_lines = " | ".join(line.strip() for line in message.splitlines()[:6] if line.strip())[:1200]
    return ExportError(f"{what} failed {doing}{where}: {type(error).__name__}: {first_lines}",
                       hint="export another format, or compile fewer levels (out_indices) to leave the op out.")
