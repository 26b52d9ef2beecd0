"""ONNX export (the dynamo-based exporter, else the TorchScript-based one), checked with ONNX Runtime, with the
``feature_info`` in the model's metadata."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
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
SINGLE_FILE_LIMIT = 2**31 - 1  # bytes: protobuf serialises no message larger


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
    """Write ``extractor`` (with ``outputs`` outputs) to ``path`` with one exporter, as it lays the file out: the
    dynamo-based one with its weights in ``<name>.data`` beside it, the TorchScript-based one with them inline, or
    in one file per weight beside it (named after the weight) over 2 GB; :func:`finish` gives them fxfeat's layout.
    The TorchScript-based exporter is given placeholder output names: without them it reads the names from the
    module's ``graph`` as if it were a TorchScript graph, and an fx ``GraphModule``'s is not."""
    common = dict(input_names=[INPUT_NAME], opset_version=opset)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporters' progress and deprecation chatter
        if exporter == "dynamo":
            torch.onnx.export(extractor, (example,), str(path), dynamo=True, external_data=True,
                              dynamic_shapes=({parity.AXES[dim]: torch.export.Dim.AUTO for dim in dims},), **common)
        else:
            placeholders = [f"output_{index}" for index in range(outputs)]
            torch.onnx.export(extractor, (example,), str(path), dynamo=False, output_names=placeholders,
                              dynamic_axes={INPUT_NAME: {parity.AXES[dim]: dim for dim in dims}}, **common)


def data_file(path: Path) -> Path:
    """The external data file of the ONNX file ``path``: ``model.onnx.data`` beside ``model.onnx``."""
    return path.with_name(f"{path.name}.data")


def finish(exported: Path, destination: Path, names: list[str], metadata: dict[str, str],
           external_data: bool | None) -> Path | None:
    """Name the outputs and write the ``metadata`` of the model an exporter wrote at ``exported``, and save it at
    ``destination`` in a directory of its own: in one file, or with its weights in :func:`data_file` beside it
    (``external_data``; ``None``: where one file would pass :data:`SINGLE_FILE_LIMIT`). The weights are not read
    where the exporter's data file is already that one. Returns the data file, if any."""
    onnx, _ = onnx_runtime()
    model = onnx.load(str(exported), load_external_data=False)
    rename_outputs(model.graph, names)
    onnx.helper.set_model_props(model, metadata)
    outside = external_sizes(model, exported.parent)
    size = model.ByteSize() + sum(outside.values())
    if external_data is False and size > SINGLE_FILE_LIMIT:
        raise too_large(destination, size)
    external = size > SINGLE_FILE_LIMIT if external_data is None else external_data
    data = data_file(destination)
    if external and set(outside) == {data.name}:  # the dynamo exporter's layout: the proto changes, not the data
        os.replace(exported.parent / data.name, data)
        onnx.save_model(model, str(destination))
    else:  # inline, or one file per weight (the TorchScript-based exporter over 2 GB): written again, once
        onnx.external_data_helper.load_external_data_for_model(model, str(exported.parent))
        onnx.save_model(model, str(destination), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data.name)
    return data if data.exists() else None


def external_sizes(model, directory: Path) -> dict[str, int]:
    """Bytes of the ``model``'s weights in each external file (a file beside it, in ``directory``)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    sizes: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            length = int(info.length) if info.length else (directory / info.location).stat().st_size
            sizes[info.location] = sizes.get(info.location, 0) + length
    return sizes


def weight_bytes(extractor: nn.Module) -> int:
    """The bytes of the extractor's parameters and buffers, each storage once (tied weights share one)."""
    tensors = {tensor.data_ptr(): tensor for tensor in (*extractor.parameters(), *extractor.buffers())}
    return sum(tensor.nbytes for tensor in tensors.values())


def too_large(path: Path, size: int) -> ExportError:
    return ExportError(
        f"ONNX: the model for {path.name} is {size / 2**30:.2f} GiB, over protobuf's 2 GiB limit on one file "
        "(external_data=False).",
        hint=f"leave external_data=None (or True) to write its weights to {data_file(path).name} beside it.",
    )


def place(checked: Path, data: Path | None, path: Path) -> None:
    """Move the checked model (and its data file) to ``path``; a data file an earlier export left there goes."""
    if data is not None:
        os.replace(data, data_file(path))
    else:
        data_file(path).unlink(missing_ok=True)
    os.replace(checked, path)


def to_onnx(extractor: FeatureGraphModule, path: str | Path, *, input_size: tuple[int, int, int] | None = None,
            dynamic: bool = True, opset: int | None = None, exporter: str | None = None,
            external_data: bool | None = None) -> parity.ExportReport:
    """Export ``extractor`` to the ONNX file ``path`` and check it with ONNX Runtime.

    The input is named ``image``; the outputs are named after the levels (:func:`parity.output_names`). With
    ``dynamic``, the batch, height and width are dynamic where the extractor accepts other values and the
    exported model stays equal to eager there; otherwise they are fixed to the example's, with a warning (a
    token model with a fixed grid: batch only). The ``feature_info`` is stored as JSON in the model's metadata
    (:func:`read_onnx_feature_info`). The dynamo-based exporter is tried first and the TorchScript-based one if
    it fails (``exporter="dynamo"`` or ``"torchscript"`` uses only that one); the report says which produced the
    file.

    Weights: protobuf cannot write one file over 2 GiB, so a bigger model (ViT-H, DINOv2-g) keeps its weights
    as ONNX external data in one file beside ``path``, named after it plus ``.data`` (``model.onnx.data``;
    ``report.data_path``); the two files travel together (ONNX Runtime reads the data file from the model's
    directory). ``external_data=None`` (the default) does so only over that limit, ``True`` always, ``False``
    never (an ``ExportError`` over the limit). A data file an earlier export left beside ``path`` is replaced
    or removed. The export is checked in a directory made beside ``path`` and moved to ``path`` once it passes.

    Raises:
        ExportError: every exporter tried failed or gave a model that differs from eager (the message has each
            one's reason); or the model is over 2 GiB with ``external_data=False``.
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    onnx, onnxruntime = onnx_runtime()
    if exporter not in (None, "dynamo", "torchscript"):
        raise InvalidRequestError(f"exporter must be 'dynamo', 'torchscript' or None; got {exporter!r}.",
                                  hint="leave it None to try both.")
    if external_data not in (None, True, False):
        raise InvalidRequestError(f"external_data must be True, False or None; got {external_data!r}.",
                                  hint="leave it None to keep the weights outside only over 2 GiB.")
    parity.refuse_optimized(extractor, "ONNX")
    inputs = parity.probe_inputs(extractor, input_size, dynamic)
    names, path = parity.output_names(extractor), Path(path)
    if not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):  # the export is checked in a folder there
        raise ExportError(f"ONNX: {path.parent} is not a writable directory.",
                          hint="create it first, or give another path.")
    if external_data is False and (size := weight_bytes(extractor)) > SINGLE_FILE_LIMIT:  # before exporting
        raise too_large(path, size)
    failures: list[str] = []

    def attempt(dims):
        for candidate in [exporter] if exporter else ["dynamo", "torchscript"]:
            what = f"ONNX ({candidate} exporter)"
            try:
                with tempfile.TemporaryDirectory(prefix=".fxfeat-onnx-", dir=path.parent) as work:
                    exported, checked = Path(work, "exported", path.name), Path(work, "checked", path.name)
                    exported.parent.mkdir()
                    checked.parent.mkdir()
                    try:
                        export_onnx(extractor, inputs.example, exported, candidate, dims, opset, len(names))
                        data = finish(exported, checked, names, {FEATURE_INFO_KEY: extractor.feature_info.to_json(),
                                                                 "fxfeat.exporter": candidate}, external_data)
                        session = onnxruntime.InferenceSession(str(checked), providers=["CPUExecutionProvider"])
                    except ExportError:
                        raise
                    except Exception as error:
                        raise parity.export_error(extractor, what, error) from error

                    def run(x, session=session):  # on the CPU, whatever the extractor's device
                        outputs = session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})
                        return [torch.from_numpy(output).to(x.device) for output in outputs]

                    checks = parity.compare(extractor, run, inputs.checked(dims), what)
                    del run, session  # ONNX Runtime lets go of the files before they move
                    place(checked, data, path)
                    return (candidate, data is not None), checks
            except ExportError as error:
                failures.append(str(error).split("\nHint:")[0])
        raise ExportError(" / ".join(failures[-2:] if not exporter else failures[-1:]),
                          hint="try another format (to_torchscript, to_exported_program), dynamic=False, or fewer "
                          "levels (out_indices) to leave the failing op out.")

    with parity.in_eval_mode(extractor):
        (used, external), checks, dims, notes = parity.most_dynamic(inputs, attempt)
    tried = [failure for failure in failures if failure.startswith("ONNX (dynamo") and used != "dynamo"]
    notes += tuple(f"the dynamo exporter failed: {failure}" for failure in tried[-1:])
    return parity.ExportReport("onnx", used, tuple(names), dims, checks, str(path), notes,
                               str(data_file(path)) if external else None)


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
