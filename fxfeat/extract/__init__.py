"""Features of whole image datasets: ``fxfeat.extract`` and ``fxfeat.load_features``.

One compiled (and by default optimised) extractor runs over a folder, a list file, tar shards or a dataset; the
features are written as parts (``DIR/<feature>/part-00000.npy`` beside ``DIR/metadata/part-00000.parquet``, the
layout clip-retrieval writes and embedding-reader reads) with a manifest that makes a run resumable on any number
of processes and every image written exactly once. See docs/extract.md.

Modules, in the order a run uses them: :mod:`~fxfeat.extract.features` (which tensors, one extractor),
:mod:`~fxfeat.extract.preprocess` (the model's preprocessing), :mod:`~fxfeat.extract.sources` (the data),
:mod:`~fxfeat.extract.decode` (images to tensors), :mod:`~fxfeat.extract.distributed` (torchrun),
:mod:`~fxfeat.extract.manifest` (the output directory), :mod:`~fxfeat.extract.loop` (DataLoader, forward, writer
thread), :mod:`~fxfeat.extract.parts` (one part's files), :mod:`~fxfeat.extract.run` (``extract`` itself).
"""

from fxfeat.extract.manifest import PartedArray, load_features
from fxfeat.extract.preprocess import Preprocessing, resolve_preprocessing
from fxfeat.extract.run import ExtractSummary, extract

__all__ = ["extract", "load_features", "ExtractSummary", "PartedArray", "Preprocessing", "resolve_preprocessing"]
