"""ONNX export (the dynamo-based exporter, else the TorchScript-based one), checked with ONNX Runtime, with the
``feature_info`` in the model's metadata."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from fxfeat.errors import ExportError, InvalidRequestError, MissingDependencyError
from fxfeat.export import parity
from fxfeat.feature_info import FeatureInfo
from fxfeat.module import FeatureGraphModule

__all__ = ["FEATURE_INFO_KEY", "INPUT_NAME", "read_onnx_feature_info", "rename_outputs", "to_onnx"]

FEATURE_INFO_KEY = "fxfeat.feature_info"  # the model's metadata key
INPUT_NAME = "image"


def onnx_runtime():
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(
            f"ONNX export needs the onnx and onnxruntime packages ({error.name} is not installed).",
            hint="pip install 'fxfeat[onnx]' (onnx, onnxruntime, onnxscript).",
        ) from error
    return onnx, onnxruntime


def rename_outputs(graph, names: list[str]) -> None:
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


def export_onnx(extractor: nn.Module, example: torch.Tensor, path: Path, exporter: str,
                 dims: tuple[str, ...], opset: int | None, outputs: int) -> None:
    """Write ``extractor`` (with ``outputs`` outputs) to ``path`` with one exporter; its outputs are named
    afterwards (:func:`rename_outputs`). The TorchScript-based exporter is given placeholder output names: without
    them it reads the names from the module's ``graph`` as if it were a TorchScript graph, and an fx
    ``GraphModule``'s is not."""
    common = dict(input_names=[INPUT_NAME], opset_version=opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' progress and deprecation chatter
        if exporter == "dynamo":
            torch.onnx.export(extractor, (example,), str(path), dynamo=True, external_data=False,
                              dynamic_shapes=({parity.AXES[dim]: torch.export.Dim.AUTO for dim in dims},), **common)
        else:
            placeholders = [f"output_{index}" for index in range(outputs)]
            torch.onnx.export(extractor, (example,), str(path), dynamo=False, output_names=placeholders,
                              dynamic_axes={INPUT_NAME: {parity.AXES[dim]: dim for dim in dims}}, **common)


def to_onnx(extractor: FeatureGraphModule, path: str | Path, *, input_size: tuple[int, int, int] | None = None,
            dynamic: bool = True, opset: int | None = None, exporter: str | None = None) -> parity.ExportReport:
    """Export ``extractor`` to the ONNX file ``path`` and check it with ONNX Runtime.

    The input is named ``image``; the outputs are named after the levels (:func:`parity.output_names`). With
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
    onnx, onnxruntime = onnx_runtime()
    if exporter not in (None, "dynamo", "torchscript"):
        raise InvalidRequestError(f"exporter must be 'dynamo', 'torchscript' or None; got {exporter!r}.",
                                  hint="leave it None to try both.")
    parity.refuse_optimized(extractor, "ONNX")
    inputs = parity.probe_inputs(extractor, input_size, dynamic)
    names, path = parity.output_names(extractor), Path(path)
    failures: list[str] = []

    def attempt(dims):
        for candidate in [exporter] if exporter else ["dynamo", "torchscript"]:
            what = f"ONNX ({candidate} exporter)"
            try:
                try:
                    export_onnx(extractor, inputs.example, path, candidate, dims, opset, len(names))
                    model = onnx.load(str(path))
                    rename_outputs(model.graph, names)
                    onnx.helper.set_model_props(model, {FEATURE_INFO_KEY: extractor.feature_info.to_json(),
                                                        "fxfeat.exporter": candidate})
                    onnx.save(model, str(path))
                    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                except Exception as error:
                    raise parity.export_error(extractor, what, error) from error

                def run(x, session=session):  # on the CPU, whatever the extractor's device
                    outputs = session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})
                    return [torch.from_numpy(output).to(x.device) for output in outputs]

                return candidate, parity.compare(extractor, run, inputs.checked(dims), what)
            except ExportError as error:
                failures.append(str(error).split("\nHint:")[0])
        raise ExportError(" / ".join(failures[-2:] if not exporter else failures[-1:]),
                          hint="try another format (to_torchscript, to_exported_program), dynamic=False, or fewer "
                          "levels (out_indices) to leave the failing op out.")

    with parity.in_eval_mode(extractor):
        used, checks, dims, notes = parity.most_dynamic(inputs, attempt)
    tried = [failure for failure in failures if failure.startswith("ONNX (dynamo") and used != "dynamo"]
    notes += tuple(f"the dynamo exporter failed: {failure}" for failure in tried[-1:])
    return parity.ExportReport("onnx", used, tuple(names), dims, checks, str(path), notes)


def read_onnx_feature_info(path: str | Path) -> FeatureInfo:
    """The ``feature_info`` :func:`to_onnx` stored in the ONNX file ``path``.

    Raises:
        ExportError: the file has none (it was not written by :func:`to_onnx`).
    """
    onnx, _ = onnx_runtime()
    model = onnx.load(str(path), load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    if FEATURE_INFO_KEY not in props:
        raise ExportError(f"{path} holds no fxfeat feature_info.", hint="export it with fxfeat.export.to_onnx.")
    return FeatureInfo.from_json(props[FEATURE_INFO_KEY])
