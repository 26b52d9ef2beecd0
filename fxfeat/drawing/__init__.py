"""Pictures of extractors: ``fxfeat.plot`` (:mod:`fxfeat.drawing.figure`) draws a model's levels as one strip
(:mod:`fxfeat.drawing.levels`) from the numbers of ``feature_info`` and ``fxfeat.inspect``
(:mod:`fxfeat.drawing.summary`), and its feature maps on an image (:mod:`fxfeat.drawing.maps`). matplotlib, in
the ``plot`` extra, is imported only when a picture is drawn."""

from fxfeat.drawing.figure import plot

__all__ = ["plot"]
