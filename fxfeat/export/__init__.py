"""Stage 6 of the pipeline: export a compiled extractor to TorchScript, ONNX or ``torch.export``.

Every export runs the exported artefact against the eager extractor before returning: at the compile size and,
through the dynamic axes, at another batch and another height and width where the extractor accepts them
(:func:`close`: ``allclose`` at ``rtol=1e-4`` and an absolute tolerance scaled to the output's magnitude; the
largest difference is in the returned :class:`ExportReport`).
A failure raises :class:`~fxfeat.ExportError` naming the format, the exporter, the extractor's node where the
exporter's message names one, and the exporter's message. The exported files keep the ``feature_info``:
:func:`read_feature_info` reads it back from any of them. An ONNX model over protobuf's 2 GiB keeps its weights
in one external data file beside it (``model.onnx.data``; :func:`to_onnx`).

Example:
    >>> import torch, torchvision, fxfeat
    >>> from fxfeat.export import to_torchscript
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(3, 4), input_size=(3, 64, 64))
    >>> scripted = to_torchscript(extractor)
    >>> [tuple(f.shape) for f in scripted(torch.randn(1, 3, 64, 64))]
    [(1, 256, 4, 4), (1, 512, 2, 2)]
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from fxfeat.errors import ExportError
from fxfeat.export.exported_program import to_exported_program
from fxfeat.export.onnx_model import read_onnx_feature_info, to_onnx
from fxfeat.export.parity import FEATURE_INFO_FILE, ExportReport, ParityCheck, close, output_names
from fxfeat.export.torchscript import to_torchscript
from fxfeat.feature_info import FeatureInfo

__all__ = [
    "ExportReport",
    "ParityCheck",
    "close",
    "output_names",
    "read_feature_info",
    "read_onnx_feature_info",
    "to_exported_program",
    "to_onnx",
    "to_torchscript",
]


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
