"""fxfeat: compile any PyTorch vision model into a feature extractor with torch.fx.

Example:
    >>> import torch, torchvision, fxfeat
    >>> extractor = fxfeat.compile(torchvision.models.resnet18())
    >>> extractor.feature_info.channels()
    [64, 64, 128, 256, 512]
"""

from fxfeat import export
from fxfeat.api import Inspection, compile, inspect
from fxfeat.backbone import Backbone, backbone
from fxfeat.drawing import plot
from fxfeat.errors import (
    DataSourceError,
    DeclaredLevelError,
    ExportError,
    ExtractError,
    FxFeatError,
    FxFeatWarning,
    HeadNotFoundError,
    InputShapeError,
    InvalidModelError,
    InvalidRequestError,
    MissingDependencyError,
    NoFeatureMapsError,
    OutIndicesError,
    OutputDirectoryError,
    OutputStrideError,
    ProbeTooSmallError,
    RewriteError,
    ShapePropagationError,
    TraceFailedError,
    UnknownLevelError,
    WeightsUnavailableError,
)
from fxfeat.extraction import ExtractSummary, Preprocessing, extract, load_features
from fxfeat.feature_info import FeatureInfo
from fxfeat.freeze import freeze
from fxfeat.module import FeatureGraphModule
from fxfeat.optimize import CompileSettings, InferenceGraphModule, optimize_for_inference
from fxfeat.version import __version__ as __version__
from fxfeat.zoo import catalog

__all__ = [
    "compile",
    "backbone",
    "Backbone",
    "freeze",
    "optimize_for_inference",
    "InferenceGraphModule",
    "CompileSettings",
    "extract",
    "load_features",
    "ExtractSummary",
    "Preprocessing",
    "export",
    "inspect",
    "Inspection",
    "plot",
    "catalog",
    "FeatureInfo",
    "FeatureGraphModule",
    "DataSourceError",
    "DeclaredLevelError",
    "ExportError",
    "ExtractError",
    "FxFeatError",
    "FxFeatWarning",
    "HeadNotFoundError",
    "InputShapeError",
    "InvalidModelError",
    "InvalidRequestError",
    "MissingDependencyError",
    "NoFeatureMapsError",
    "OutIndicesError",
    "OutputDirectoryError",
    "OutputStrideError",
    "ProbeTooSmallError",
    "RewriteError",
    "ShapePropagationError",
    "TraceFailedError",
    "UnknownLevelError",
    "WeightsUnavailableError",
]
