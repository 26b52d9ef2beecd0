"""Reading an extraction back: ``fxfeat.load_features`` and the :class:`PartedArray` it returns over several parts.

The reader reads every format version :mod:`fxfeat.extraction.format` lists as readable, and checks each part with
the format's one intact check (sizes; with ``verify=True`` checksums too) before it maps any file.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from fxfeat.errors import MissingDependencyError, OutputDirectoryError
from fxfeat.extraction.filesystem import is_local, output_filesystem
from fxfeat.extraction.format import (
    check_readable,
    damaged_files,
    feature_file,
    metadata_file,
    read_manifest,
)

__all__ = ["PartedArray", "load_features", "read_features"]


class PartedArray:
    """Rows of several memory-mapped ``.npy`` parts as one read-only array: ``len``, ``shape``, ``dtype``,
    indexing by row (an int, a slice, or an array of indices; further dimensions as numpy does), and
    ``numpy.asarray`` (which reads every row into memory).

    Example:
        >>> import numpy as np
        >>> rows = PartedArray([np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)])
        >>> rows.shape, rows[3].tolist(), rows[2:4, 1].tolist(), int(np.asarray(rows).sum())
        ((5, 2), [6, 7], [5, 7], 45)
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self._starts = np.cumsum([0] + [len(part) for part in parts])
        self.dtype = parts[0].dtype
        self.shape = (int(self._starts[-1]), *parts[0].shape[1:])
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        array = np.concatenate(self.parts)
        return array if dtype is None else array.astype(dtype)

    def __getitem__(self, index):
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(rows, (int, np.integer)):
            row = int(rows) + (len(self) if rows < 0 else 0)
            if not 0 <= row < len(self):
                raise IndexError(f"row {rows} of {len(self)}")
            part = int(np.searchsorted(self._starts, row, side="right")) - 1
            return self.parts[part][(row - self._starts[part], *rest)]
        selected = np.arange(len(self))[rows]
        parts = np.searchsorted(self._starts, selected, side="right") - 1
        gathered = np.stack([self.parts[p][r - self._starts[p]] for p, r in zip(parts, selected)]) if len(
            selected) else np.empty((0, *self.shape[1:]), self.dtype)
        return gathered[(slice(None), *rest)]

    def __repr__(self) -> str:
        return f"PartedArray(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"


def load_features(path: str | os.PathLike, *, verify: bool = False, storage_options: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, np.ndarray | PartedArray], Any]:
    """Read an extraction back: per feature, every row in order, memory-mapped (the part's ``numpy.memmap`` when
    the extraction is one part, else a :class:`PartedArray` over the parts' memory maps), and the metadata as a
    pandas DataFrame in the same row order (``id`` is the image's index in the data source). An output on another
    filesystem than this machine's (``s3://``, ``memory://``) is read into memory, part by part.

    Args:
        path: the directory ``fxfeat.extract`` wrote (any format version this fxfeat reads): a path or an fsspec URL.
        verify: check every file's sha256 against the manifest (else its size only).
        storage_options: per protocol, the options of its fsspec filesystem (``{"s3": {"endpoint_url": ...}}``).

    Raises:
        OutputDirectoryError: no manifest, a format this fxfeat does not read, an incomplete run, or a part
            whose files do not match their record.
        MissingDependencyError: pandas or pyarrow is not installed.

    Example (a run of ``fxfeat.extract``'s own example writes such a directory)::

        arrays, metadata = load_features("features/")
        arrays["pooled"].shape, list(metadata.columns)   # (1000, 2048), ['id', 'path', 'label', 'width', 'height']
    """
    path = os.fspath(path)
    return read_features(path, verify, output_filesystem(path, storage_options))


def read_features(path: str, verify: bool, files: Any) -> tuple[dict[str, np.ndarray | PartedArray], Any]:
    """:func:`load_features` of a directory on the filesystem ``files``."""
    manifest = read_manifest(path, files)
    check_readable(manifest, path)
    if not manifest["complete"]:
        raise OutputDirectoryError(
            f"The extraction in {path} is incomplete: {manifest['parts_done']} of {manifest['parts_total']} parts.",
            hint="run the same fxfeat extract command again: it finishes the missing parts.")
    try:
        import pandas
    except ImportError:
        raise MissingDependencyError("fxfeat.load_features returns the metadata as a pandas DataFrame.",
                                     hint="pip install 'fxfeat[extract]' (pyarrow and pandas).") from None
    records = manifest["parts"]
    damaged = [relative for record in records for relative in damaged_files(files, path, record, checksums=verify)]
    if damaged:
        raise OutputDirectoryError(f"{path}: {', '.join(damaged)} do not match the manifest (missing, truncated or "
                                   "changed).", hint="run the same fxfeat extract command again: it redoes damaged "
                                   "parts.")
    arrays: dict[str, np.ndarray | PartedArray] = {}
    for name in manifest["config"]["features"]:
        pieces = [_rows(files, f"{path}/{feature_file(name, record['part'])}") for record in records]
        arrays[name] = pieces[0] if len(pieces) == 1 else PartedArray(pieces)
    frames = []
    for record in records:
        with files.open(f"{path}/{metadata_file(record['part'])}", "rb") as handle:
            frames.append(pandas.read_parquet(handle))
    return arrays, pandas.concat(frames, ignore_index=True)


def _rows(files: Any, path: str) -> np.ndarray:
    """A part's rows: memory-mapped on this machine's filesystems, else read (in one request)."""
    if is_local(files):
        return np.load(files._strip_protocol(path), mmap_mode="r")
    return np.load(io.BytesIO(files.cat_file(path)))
