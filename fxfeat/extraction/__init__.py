"""Features of whole image datasets: ``fxfeat.extract`` and ``fxfeat.load_features``.

One compiled (and by default optimised) extractor runs over a folder, a list file, tar shards or a dataset; the
features are written as parts (``DIR/<feature>/part-00000.npy`` beside ``DIR/metadata/part-00000.parquet``, the
layout clip-retrieval writes and embedding-reader reads) with a manifest that makes a run resumable on any number
of processes and every image written exactly once. See docs/extract.md.

Modules, in the order a run uses them: :mod:`~fxfeat.extraction.features` (which tensors, one extractor),
:mod:`~fxfeat.extraction.preprocess` (the model's preprocessing), :mod:`~fxfeat.extraction.sources` (the data:
open, list, describe), :mod:`~fxfeat.extraction.decode` (images to tensors), :mod:`~fxfeat.extraction.distributed`
(torchrun), :mod:`~fxfeat.extraction.directory` (the writer's side of the output directory),
:mod:`~fxfeat.extraction.loop` (DataLoader, forward, writer thread), :mod:`~fxfeat.extraction.parts` (one part's
files), :mod:`~fxfeat.extraction.run` (``extract`` itself); :mod:`~fxfeat.extraction.reader` reads an output back.
:mod:`~fxfeat.extraction.format` owns the format (layout, version, configuration, intact check) that the writer
and the reader share, and :mod:`~fxfeat.extraction.filesystem` holds their file operations.
"""

from fxfeat.extraction.preprocess import Preprocessing, resolve_preprocessing
from fxfeat.extraction.reader import PartedArray, load_features
from fxfeat.extraction.run import ExtractSummary, extract

__all__ = ["extract", "load_features", "ExtractSummary", "PartedArray", "Preprocessing", "resolve_preprocessing"]
