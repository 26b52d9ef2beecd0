"""Stage 6 of the pipeline: export a compiled extractor to TorchScript, ONNX or ``torch.export``.

Every export runs the exported artefact against the eager extractor before returning: at the compile size and,
through the dynamic axes, at another batch and another height and width where the extractor accepts them
(:func:`close`: ``allclose`` at ``rtol=1e-4`` and an absolute tolerance scaled to the output's magnitude; the
largest difference is in the returned :class:`ExportReport`).
A failure raises :class:`~fxfeat.ExportError` naming the format, the exporter, the extractor's node where the
exporter's message names one, and the exporter's message. The exported files keep the ``feature_info``:
:func:`read_feature_info` reads it back from any of them.

Example:
    >>> import torch, torchvision, fxfeat
    >>> from fxfeat.export import to_torchscript
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(3, 4), input_size=(3, 64, 64))
    >>> scripted = to_torchscript(extractor)
    >>> [tuple(f.shape) for f in scripted(torch.randn(1, 3, 64, 64))]
    [(1, 256, 4, 4), (1, 512, 2, 2)]
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxfeat.errors import ExportError, FxFeatWarning, InvalidRequestError, MissingDependencyError
from fxfeat.feature_info import FeatureInfo
from fxfeat.module import FeatureGraphModule
from fxfeat.optimize import InferenceGraphModule
from fxfeat.trace import DEFAULT_INPUT_SIZE, evaluation_mode
from fxfeat.trace.values import example_batch

__all__ = [
    "ExportReport",
    "ParityCheck",
    "read_feature_info",
    "read_onnx_feature_info",
    "to_exported_program",
    "to_onnx",
    "to_torchscript",
]

RTOL, ATOL = 1e-4, 1e-5  # exported against eager, fp32 (see close())
FEATURE_INFO_KEY = "fxfeat.feature_info"  # ONNX metadata key; the archive member is FEATURE_INFO_FILE
FEATURE_INFO_FILE = "fxfeat_feature_info.json"
INPUT_NAME = "image"
_BATCH, _OTHER_BATCH = 2, 3  # torch.export specialises sizes 0 and 1: the example batch must be larger
_OTHER_SIZE = (32, 64)  # added to the height and width for the second parity check


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
    """

    format: str
    exporter: str
    output_names: tuple[str, ...]
    dynamic: tuple[str, ...]
    checks: tuple[ParityCheck, ...]
    path: str | None = None
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"{self.format} ({self.exporter})" + (f" -> {self.path}" if self.path else ""),
                 f"  dynamic input dims: {', '.join(self.dynamic) or 'none'}"]
        lines += [f"  parity vs eager at {tuple(c.input_shape)}: max abs error {c.max_abs_error:.3g} "
                  f"(tolerance: rtol {RTOL}, atol {ATOL} + {RTOL} x max |output|)" for c in self.checks]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def output_names(extractor: FeatureGraphModule) -> list[str]:
    """Names of the extractor's outputs in order: the dict keys if it returns a dict, else each level's module
    path (``pooled`` for pooled features, which no module returns; else the node name), made into unique
    identifiers.

    Example:
        >>> import torchvision, fxfeat
        >>> output_names(fxfeat.compile(torchvision.models.resnet18(), out_indices=(1, 2)))
        ['layer1', 'layer2']
    """
    keys = _returned_keys(extractor)
    if keys is None:
        keys = [entry["module"] or ("pooled" if entry.get("fmt") == "NC" else entry["node"])
                for entry in extractor.feature_info.get_dicts()]
    names: list[str] = []
    for key in keys:
        name = re.sub(r"\W", "_", str(key)) or "output"
        name = f"_{name}" if name[0].isdigit() else name
        while name in names:
            name += "_"
        names.append(name)
    return names


def _returned_keys(extractor: FeatureGraphModule) -> list[str] | None:
    output = next(node for node in reversed(extractor.graph.nodes) if node.op == "output")
    returned = output.args[0]
    return list(returned) if isinstance(returned, dict) else None


def _flat(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs)


@contextlib.contextmanager
def _in_eval_mode(extractor: nn.Module) -> Iterator[None]:
    """Exports are inference graphs: the extractor is in eval mode for the duration, then every module's flag
    is as it was (the modules are the model's, whose flags may differ from one another)."""
    try:
        with evaluation_mode(extractor):
            yield
    finally:
        if isinstance(extractor, FeatureGraphModule):
            extractor._use_mode_graph()  # flags were set back without train(): the graph follows


@dataclass(frozen=True)
class _Inputs:
    example: torch.Tensor
    others: dict[tuple[str, ...], torch.Tensor]  # an input changing those dims, where the extractor accepts it
    notes: tuple[str, ...]

    @property
    def dynamic(self) -> tuple[str, ...]:
        return tuple(dim for dims in self.others for dim in dims)

    def checked(self, dims: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        """The example and the inputs that change only ``dims``."""
        return (self.example, *(x for changed, x in self.others.items() if set(changed) <= set(dims)))


def _inputs(extractor: FeatureGraphModule, input_size: tuple[int, int, int] | None, dynamic: bool) -> _Inputs:
    """The example input, and which dims may change: each is tried on the eager extractor."""
    if not isinstance(extractor, FeatureGraphModule):
        raise InvalidRequestError(
            f"Only extractors made by fxfeat.compile can be exported; got {type(extractor).__name__}.",
            hint="call fxfeat.compile(model, ...) first and export what it returns.",
        )
    size = tuple(input_size or extractor.input_size or DEFAULT_INPUT_SIZE)
    example = example_batch(extractor, size, _BATCH)
    if not dynamic:
        return _Inputs(example, {}, ())
    channels, height, width = size
    trials = {
        ("batch",): example_batch(extractor, size, _OTHER_BATCH),
        ("height", "width"): example_batch(extractor, (channels, height + _OTHER_SIZE[0], width + _OTHER_SIZE[1])),
    }
    accepted, notes = {}, []
    for dims, other in trials.items():
        try:
            with _in_eval_mode(extractor), torch.no_grad():
                extractor.run_quietly(other)
            accepted[dims] = other
        except Exception as error:
            notes.append(f"{' and '.join(dims)} fixed: the extractor does not run at input {tuple(other.shape)} "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
    for note in notes:
        warnings.warn(f"export: {note}", FxFeatWarning, stacklevel=3)
    return _Inputs(example, accepted, tuple(notes))


def _most_dynamic(inputs: _Inputs, attempt) -> tuple[Any, tuple[ParityCheck, ...], tuple[str, ...], tuple[str, ...]]:
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


def _compare(extractor: nn.Module, run, inputs: tuple[torch.Tensor, ...], what: str) -> tuple[ParityCheck, ...]:
    """Run ``run`` (the exported artefact, as a function of one input returning a flat list) against eager."""
    checks = []
    for x in inputs:
        with torch.no_grad():
            expected = _flat(extractor(x))
        try:
            actual = run(x)
        except Exception as error:
            raise _export_error(extractor, what, error, f"running it on an input of shape {tuple(x.shape)}") from error
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


def _refuse_optimized(extractor: nn.Module, what: str) -> None:
    """An extractor ``optimize_for_inference`` rewrote holds CPU kernels (oneDNN layers with weight caches) that
    TorchScript and ONNX cannot express; the extractor itself exports, and the runtimes optimise on their own."""
    if isinstance(extractor, InferenceGraphModule):
        raise ExportError(
            f"{what} cannot export a module optimize_for_inference returned: its oneDNN layers and in-place "
            "helpers are CPU kernels and Python caches, not TorchScript or ONNX operators",
            hint="export the extractor fxfeat.compile returned; ONNX Runtime and TorchScript's own "
                 "optimize_for_inference fold and fuse it for their runtime",
        )


def _export_error(extractor: nn.Module, what: str, error: Exception, doing: str = "exporting") -> ExportError:
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


def to_torchscript(extractor: FeatureGraphModule, method: str = "script", *, path: str | Path | None = None,
                   input_size: tuple[int, int, int] | None = None, return_report: bool = False):
    """TorchScript of ``extractor``, by ``torch.jit.script`` (``method="script"``) or ``torch.jit.trace``.

    Outputs keep their structure (a list, a dict or one tensor). A scripted extractor keeps the Python on shapes
    the model has; a traced one records the example's path through it, so where that depends on the input size
    (a window partition's padding) the report's ``dynamic`` leaves out the height and width, with a warning, and
    the traced module must be given inputs of the example's size. ``path`` saves it, with the ``feature_info``
    as an extra file :func:`read_feature_info` reads. With ``return_report``, returns ``(module, report)``.

    Raises:
        ExportError: scripting or tracing failed, or the result differs from eager.
    """
    if method not in ("script", "trace"):
        raise InvalidRequestError(f"method must be 'script' or 'trace'; got {method!r}.", hint="method='script'.")
    what = f"TorchScript ({method})"
    _refuse_optimized(extractor, what)
    inputs = _inputs(extractor, input_size, dynamic=True)
    with _in_eval_mode(extractor), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        try:
            if method == "script":
                module = torch.jit.script(extractor)
            else:
                with torch.no_grad():  # the inference path, as eager runs it (nn.MultiheadAttention's fast path)
                    module = torch.jit.trace(extractor, inputs.example, strict=False, check_trace=False)
        except Exception as error:
            raise _export_error(extractor, what, error) from error

        def check(dims):
            return module, _compare(extractor, lambda x: _flat(module(x)), inputs.checked(dims), what)

        module, checks, dims, notes = _most_dynamic(inputs, check)
    if path is not None:
        torch.jit.save(module, str(path), _extra_files={FEATURE_INFO_FILE: extractor.feature_info.to_json()})
    report = ExportReport("torchscript", method, tuple(output_names(extractor)), dims, checks,
                          str(path) if path else None, notes)
    return (module, report) if return_report else module


_AXES = {"batch": 0, "height": 2, "width": 3}


def to_exported_program(extractor: FeatureGraphModule, *, path: str | Path | None = None,
                        input_size: tuple[int, int, int] | None = None, dynamic: bool = True,
                        return_report: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``extractor``, with the batch, height and width dynamic where the extractor accepts
    other values and the exported program stays equal to eager there (``dynamic=False``: all fixed). The
    program's ``graph_module.meta["feature_info"]`` holds the ``feature_info``; ``path`` saves the program with
    it (``torch.export.save``; read it back with :func:`read_feature_info`). With ``return_report``, returns
    ``(program, report)``.

    Raises:
        ExportError: ``torch.export`` failed, or the program differs from eager.
    """
    inputs = _inputs(extractor, input_size, dynamic)
    what = "torch.export"

    def attempt(dims):
        shapes = ({_AXES[dim]: torch.export.Dim.AUTO for dim in dims},)
        try:
            program = torch.export.export(extractor, (inputs.example,), dynamic_shapes=shapes)
        except Exception as error:
            raise _export_error(extractor, what, error) from error
        runnable = program.module()
        return program, _compare(extractor, lambda x: _flat(runnable(x)), inputs.checked(dims), what)

    with _in_eval_mode(extractor):
        program, checks, dims, notes = _most_dynamic(inputs, attempt)
    program.graph_module.meta["feature_info"] = extractor.feature_info
    if path is not None:
        torch.export.save(program, str(path), extra_files={FEATURE_INFO_FILE: extractor.feature_info.to_json()})
    report = ExportReport("exported_program", "torch.export", tuple(output_names(extractor)), dims, checks,
                          str(path) if path else None, notes)
    return (program, report) if return_report else program


def _onnx_runtime():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export needs the onnx and onnxruntime packages ({error.name} is not installed).",
            hint="pip install 'fxfeat[onnx]' (onnx, onnxruntime, onnxscript).",
        ) from error
    return onnx, onnxruntime


def _rename_outputs(graph, names: list[str]) -> None:
    """Give the ONNX ``graph``'s outputs ``names``. Exporters name values after the fx nodes, and a level's name
    may be one of them (an output named ``permute`` beside an internal ``permute`` makes an invalid model), so
    an internal value holding a wanted name is renamed first."""

    def rename(old: str, new: str) -> None:
        for node in graph.node:
            for field in (node.input, node.output):
                if old in field:
                    renamed = [new if name == old else name for name in field]
                    del field[:]
                    field.extend(renamed)
        for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
            if value.name == old:
                value.name = new

    current = [output.name for output in graph.output]
    for index, name in enumerate(current):  # out of the way first: the wanted names may be swapped
        rename(name, f"__fxfeat_output_{index}")
    used = {name for node in graph.node for name in (*node.input, *node.output)}
    used |= {value.name for value in (*graph.input, *graph.value_info, *graph.initializer)}
    for name in names:
        if name in used:
            rename(name, f"{name}__internal")
    for index, name in enumerate(names):
        rename(f"__fxfeat_output_{index}", name)


def _export_onnx(extractor: nn.Module, example: torch.Tensor, path: Path, exporter: str,
                 dims: tuple[str, ...], opset: int | None) -> None:
    common = dict(input_names=[INPUT_NAME], opset_version=opset)  # outputs are named afterwards (_rename_outputs)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' progress and deprecation chatter
        if exporter == "dynamo":
            torch.onnx.export(extractor, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({_AXES[dim]: torch.export.Dim.AUTO for dim in dims},), **common)
        else:
            torch.onnx.export(extractor, (example,), str(path), dynamo=False,
                              dynamic_axes={INPUT_NAME: {_AXES[dim]: dim for dim in dims}}, **common)


def to_onnx(extractor: FeatureGraphModule, path: str | Path, *, input_size: tuple[int, int, int] | None = None,
            dynamic: bool = True, opset: int | None = None, exporter: str | None = None) -> ExportReport:
    """Export ``extractor`` to the ONNX file ``path`` and check it with ONNX Runtime.

    The input is named ``image``; the outputs are named after the levels (:func:`output_names`). With
    ``dynamic``, the batch, height and width are dynamic where the extractor accepts other values and the
    exported model stays equal to eager there; otherwise they are fixed to the example's, with a warning (a
    token model with a fixed grid: batch only). The ``feature_info`` is stored as JSON in the model's metadata
    (:func:`read_onnx_feature_info`). The dynamo-based exporter is tried first and the TorchScript-based one if
    it fails (``exporter="dynamo"`` or ``"torchscript"`` uses only that one); the report says which produced the
    file.

    Raises:
        ExportError: every exporter tried failed or gave a model that differs from eager; the message has each
            one's reason.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    onnx, onnxruntime = _onnx_runtime()
    if exporter not in (None, "dynamo", "torchscript"):
        raise InvalidRequestError(f"exporter must be 'dynamo', 'torchscript' or None; got {exporter!r}.",
                                  hint="leave it None to try both.")
    _refuse_optimized(extractor, "ONNX")
    inputs = _inputs(extractor, input_size, dynamic)
    names, path = output_names(extractor), Path(path)
    failures: list[str] = []

    def attempt(dims):
        for candidate in [exporter] if exporter else ["dynamo", "torchscript"]:
            what = f"ONNX ({candidate} exporter)"
            try:
                try:
                    _export_onnx(extractor, inputs.example, path, candidate, dims, opset)
                    model = onnx.load(str(path))
                    _rename_outputs(model.graph, names)
                    onnx.helper.set_model_props(model, {FEATURE_INFO_KEY: extractor.feature_info.to_json(),
                                                        "fxfeat.exporter": candidate})
                    onnx.save(model, str(path))
                    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                except Exception as error:
                    raise _export_error(extractor, what, error) from error

                def run(x, session=session):  # on the CPU, whatever the extractor's device
                    outputs = session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})
                    return [torch.from_numpy(output).to(x.device) for output in outputs]

                return candidate, _compare(extractor, run, inputs.checked(dims), what)
            except ExportError as error:
                failures.append(str(error).split("\nHint:")[0])
        raise ExportError(" / ".join(failures[-2:] if not exporter else failures[-1:]),
                          hint="try another format (to_torchscript, to_exported_program), dynamic=False, or fewer "
                          "levels (out_indices) to leave the failing op out.")

    with _in_eval_mode(extractor):
        used, checks, dims, notes = _most_dynamic(inputs, attempt)
    tried = [failure for failure in failures if failure.startswith("ONNX (dynamo") and used != "dynamo"]
    notes += tuple(f"the dynamo exporter failed: {failure}" for failure in tried[-1:])
    return ExportReport("onnx", used, tuple(names), dims, checks, str(path), notes)


def read_onnx_feature_info(path: str | Path) -> FeatureInfo:
    """The ``feature_info`` :func:`to_onnx` stored in the ONNX file ``path``.

    Raises:
        ExportError: the file has none (it was not written by :func:`to_onnx`).
    """
    onnx, _ = _onnx_runtime()
    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    if FEATURE_INFO_KEY not in props:
        raise ExportError(f"{path} holds no fxfeat feature_info.", hint="export it with fxfeat.export.to_onnx.")
    return FeatureInfo.from_json(props[FEATURE_INFO_KEY])


def read_feature_info(path: str | Path) -> FeatureInfo:
    """The ``feature_info`` saved with an exported extractor: an ONNX file, a TorchScript archive or a
    ``torch.export`` archive.

    Raises:
        ExportError: the file holds no fxfeat ``feature_info``.
    """
    if not zipfile.is_zipfile(path):
        return read_onnx_feature_info(path)
    with zipfile.ZipFile(path) as archive:
        member = next((name for name in archive.namelist() if name.endswith(f"/{FEATURE_INFO_FILE}")), None)
        if member is None:
            raise ExportError(f"{path} holds no fxfeat feature_info.",
                              hint="export it with fxfeat.export (to_torchscript or to_exported_program with path=).")
        return FeatureInfo.from_json(archive.read(member).decode())
