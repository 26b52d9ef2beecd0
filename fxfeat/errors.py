"""The one error hierarchy of fxfeat.

Every problem a user can cause is reported as a subclass of :class:`FxFeatError` whose message states the
fact, names the model, node or module involved, and ends with a ``Hint:`` giving the next step.

Example:
    >>> import torch, fxfeat
    >>> try:
    ...     fxfeat.compile("resnet50")
    ... except fxfeat.FxFeatError as error:
    ...     print(type(error).__name__)
    InvalidModelError
"""

from __future__ import annotations

__all__ = [
    "FxFeatError",
    "InvalidModelError",
    "InvalidRequestError",
    "OutIndicesError",
    "ProbeTooSmallError",
    "DeclaredLevelError",
    "UnknownLevelError",
    "TraceFailedError",
    "ShapePropagationError",
    "NoFeatureMapsError",
    "HeadNotFoundError",
    "OutputStrideError",
    "RewriteError",
    "InputShapeError",
    "ExportError",
    "MissingDependencyError",
    "WeightsUnavailableError",
    "DataSourceError",
    "OutputDirectoryError",
    "ExtractError",
]


class FxFeatError(Exception):
    """Base class of every error fxfeat raises on purpose.

    Args:
        message: what is wrong, naming the model, node or module involved.
        hint: the next step for the user; appended as ``Hint: ...``.
    """

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message}\nHint: {hint}" if hint else message)


class InvalidModelError(FxFeatError, TypeError):
    """The object given as a model is not something fxfeat can compile (e.g. not an ``nn.Module``)."""


class InvalidRequestError(FxFeatError, ValueError):
    """An argument of ``compile``/``inspect`` is malformed (wrong type, unknown mode, ...)."""


class OutIndicesError(InvalidRequestError, IndexError):
    """``out_indices`` selects a level that does not exist."""


class ProbeTooSmallError(InvalidRequestError):
    """The probe input is so small that some level's map is 1 pixel high or wide, so the levels cannot be told
    apart."""


class DeclaredLevelError(FxFeatError, ValueError):
    """A level the model declares in its own ``feature_info`` cannot be placed in the traced graph."""


class UnknownLevelError(InvalidRequestError, KeyError):
    """A name in ``levels=[...]`` is neither a module path nor an fx node name of the model."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return Exception.__str__(self)


class TraceFailedError(FxFeatError, RuntimeError):
    """``torch.fx`` could not trace the model, even after making failing submodules opaque."""


class ShapePropagationError(FxFeatError, RuntimeError):
    """Running the traced model on a probe input failed.

    Attributes:
        node: the fx node that failed (``None`` if unknown).
        cause: the op's own error.
        input_channels: where the probe failed at the graph's first convolution and it takes another number of
            input channels than the probe had, that number (``None`` otherwise).
    """

    node = None
    cause = None
    input_channels = None


class NoFeatureMapsError(FxFeatError, ValueError):
    """The model computes no spatial feature map (e.g. an MLP), so there is nothing to extract."""


class HeadNotFoundError(FxFeatError, ValueError):
    """``mode="unpooled"``/``"pooled"`` found no global pooling or no classifier in the model."""


class OutputStrideError(FxFeatError, ValueError):
    """The model cannot run at the requested ``output_stride`` (a patch embedding, a grid-sized reshape...)."""


class RewriteError(FxFeatError, RuntimeError):
    """A rewrite pass failed; the message names the pass."""


class InputShapeError(FxFeatError, ValueError):
    """An extractor traced through Python that depends on the input's shape was called with another shape."""


class ExportError(FxFeatError, RuntimeError):
    """Exporting an extractor failed, or the exported artefact does not match the eager extractor; the message
    names the format, the exporter, and the node or op the exporter reported."""


class MissingDependencyError(FxFeatError, ImportError):
    """An optional package a feature needs (``onnx``, ``onnxruntime``) is not installed."""


class WeightsUnavailableError(FxFeatError, RuntimeError):
    """A model's pretrained weights cannot be downloaded, or a checkpoint does not fit the model."""


class DataSourceError(InvalidRequestError):
    """``fxfeat.extract``'s data is missing, empty, or not a source it reads (folder, list, tar shards,
    dataset)."""


class OutputDirectoryError(FxFeatError, RuntimeError):
    """``fxfeat.extract``'s output directory holds other files, or features of another configuration; or
    ``fxfeat.load_features`` finds it incomplete or damaged."""


class ExtractError(FxFeatError, RuntimeError):
    """An image could not be read during ``fxfeat.extract(on_error="raise")``; the message names the file."""


class FxFeatWarning(UserWarning):
    """Something fxfeat worked around (a submodule made opaque, a declared ``feature_info`` ignored...)."""


__all__.append("FxFeatWarning")
