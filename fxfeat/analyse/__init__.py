"""Stage 2 of the pipeline: analyses of a traced model. They annotate, they never change the graph.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> analysis = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224))
    >>> [level.channels for level in analysis.levels]
    [64, 64, 128, 256, 512]
"""

from fxfeat.analyse.aliases import Aliases
from fxfeat.analyse.analysis import GraphAnalysis, analyse
from fxfeat.analyse.heads import Head
from fxfeat.analyse.levels import Level, StrideChange
from fxfeat.analyse.shapes import NodeShape

__all__ = ["Aliases", "GraphAnalysis", "Head", "Level", "NodeShape", "StrideChange", "analyse"]
