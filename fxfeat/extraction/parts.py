"""Writing one part of an extraction: a ``.npy`` file per feature and a ``.parquet`` metadata file, made visible
all together or not at all.

Rows stream into the run's temporary folder as batches arrive (a part never sits in memory: a pyramid of maps for
10,000 images is gigabytes). On :meth:`PartWriter.commit` every file is made durable, hashed, renamed into place
(the layout of :mod:`fxfeat.extraction.format`), and then the part's record is written: the record is what says a
part exists, so a crash before it leaves a part that the next run redoes, never one that counts.

On a filesystem other than this machine's (an object store, ``memory://``), whose files are uploaded whole and
cannot be written back into, the rows stream into a local folder instead; on commit each file is uploaded to the
run's temporary folder in the output, moved to its name (a copy on an object store), and the record written last.

Example:
    >>> import tempfile, numpy as np
    >>> out = tempfile.mkdtemp()
    >>> writer = PartWriter(out, part=0, rows=(0, 3), features={"pooled": ((2,), np.float16)})
    >>> writer.add(ids=[0, 1], keys=["a.jpg", "b.jpg"], labels=[0, 1], sizes=[(4, 3), (5, 5)],
    ...            arrays={"pooled": np.ones((2, 2), np.float16)})
    >>> writer.skip(2, "c.jpg", "not a readable image")
    >>> record = writer.commit()
    >>> record["count"], sorted(record["files"]), np.load(f"{out}/pooled/part-00000.npy").shape
    (2, ['metadata/part-00000.parquet', 'pooled/part-00000.npy'], (2, 2))
"""

from __future__ import annotations

import json
import tempfile
import time
from typing import IO, Any

import numpy as np

from fxfeat.errors import MissingDependencyError
from fxfeat.extraction.filesystem import (
    digest,
    durable,
    is_local,
    local_files,
    move,
    output_filesystem,
    remove,
    write_file,
)
from fxfeat.extraction.format import (
    METADATA_COLUMNS,
    feature_file,
    metadata_file,
    part_name,
    record_file,
    temporary_folder,
)

__all__ = ["PartWriter"]


class _NpyStream:
    """A ``.npy`` file written row block by row block. numpy's header (``numpy.lib.format``) leaves room for the
    first dimension to grow in place, so it is written for no rows first and rewritten with the row count on
    :meth:`close`, at the same length."""

    def __init__(self, files: Any, path: str, row_shape: tuple[int, ...], dtype: np.dtype):
        self.files, self.path, self.row_shape, self.dtype, self.rows = files, path, tuple(row_shape), np.dtype(
            dtype), 0
        self._file: IO = files.open(path, "wb")
        self._data_offset = self._write_header()

    def _write_header(self) -> int:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, *self.row_shape)}
        np.lib.format.write_array_header_1_0(self._file, header)
        return self._file.tell()

    def write(self, array: np.ndarray) -> None:
        if array.shape[1:] != self.row_shape or array.dtype != self.dtype:
            raise ValueError(f"rows of shape {array.shape[1:]} and dtype {array.dtype} written to a part of rows "
                             f"{self.row_shape} {self.dtype} (an input of another size?)")
        self._file.write(np.ascontiguousarray(array).data)
        self.rows += len(array)

    def close(self) -> None:
        self._file.seek(0)
        if self._write_header() != self._data_offset:  # numpy's header no longer grows in place
            raise RuntimeError(f"the .npy header of {self.path} changed length with its row count")
        durable(self._file)
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        remove(self.files, self.path)


class PartWriter:
    """The files of one part, written as batches arrive and made visible by :meth:`commit`.

    Args:
        out: the output directory.
        part: the part's number.
        rows: ``(first, stop)`` dataset indices of the part.
        features: per feature name, ``(row shape, numpy dtype)``.
        run: this run's (and process's) name for its temporary folder.
        files: the fsspec filesystem the output lives on (by default the one its path names).
    """

    def __init__(self, out: str, part: int, rows: tuple[int, int], features: dict[str, tuple[tuple, Any]],
                 run: str = "0", files: Any = None):
        self.out, self.part, self.first, self.stop = out, part, rows[0], rows[1]
        self.files = files if files is not None else output_filesystem(out)
        self.started = time.perf_counter()
        self.temporary = f"{out}/{temporary_folder(run)}"
        # Rows are written as they arrive to the output's temporary folder, or, for a filesystem other than this
        # machine's, to a local folder whose files commit() uploads.
        self._local = local_files()
        temporary = self.temporary if is_local(self.files) else tempfile.mkdtemp(prefix="fxfeat-part-")
        self._local.makedirs(temporary, exist_ok=True)
        self._staging = temporary
        self._arrays = {name: _NpyStream(self._local, f"{temporary}/{part_name(part)}.{name}.npy", shape, dtype)
                        for name, (shape, dtype) in features.items()}
        self._metadata: dict[str, list] = {name: [] for name, _ in METADATA_COLUMNS}
        self._skipped: list[dict[str, Any]] = []
        self._temporary_metadata = f"{temporary}/{part_name(part)}.metadata.parquet"

    def add(self, ids: list[int], keys: list[str | None], labels: list[int | None], sizes: list[tuple[int, int]],
            arrays: dict[str, np.ndarray]) -> None:
        """Append rows: dataset ids, paths (or keys), labels, original ``(width, height)``, and each feature's
        rows in the same order."""
        for name, array in arrays.items():
            self._arrays[name].write(array)
        self._metadata["id"] += ids
        self._metadata["path"] += keys
        self._metadata["label"] += labels
        self._metadata["width"] += [width for width, _ in sizes]
        self._metadata["height"] += [height for _, height in sizes]

    def skip(self, index: int, key: str | None, reason: str) -> None:
        """Record an image that could not be read."""
        self._skipped.append({"id": index, "path": key, "reason": reason})

    def commit(self, run: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make the part visible and record it (with ``run``: how it was computed); returns the record."""
        files = {}
        for name, stream in self._arrays.items():
            stream.close()
            files[feature_file(name, self.part)] = stream.path
        self._write_metadata()
        files[metadata_file(self.part)] = self._temporary_metadata
        described = {}
        for relative, temporary in files.items():
            described[relative] = {"sha256": digest(self._local, temporary), "bytes": self._local.size(temporary)}
            if self._staging != self.temporary:  # staged on this machine: upload it to the run's folder
                uploaded = f"{self.temporary}/{temporary.rpartition('/')[2]}"
                self.files.put_file(temporary, uploaded)
                remove(self._local, temporary)
                temporary = uploaded
            self.files.makedirs(f"{self.out}/{relative.rpartition('/')[0]}", exist_ok=True)
            move(self.files, temporary, f"{self.out}/{relative}")
        self._drop_staging()
        record = {"part": self.part, "rows": [self.first, self.stop], "count": len(self._metadata["id"]),
                  "files": described, "skipped": self._skipped,
                  "seconds": round(time.perf_counter() - self.started, 3), "run": run}
        write_file(self.files, f"{self.out}/{record_file(self.part)}", json.dumps(record, indent=1).encode())
        return record

    def abort(self) -> None:
        """Drop the part's temporary files (an interrupted run)."""
        for stream in self._arrays.values():
            stream.abort()
        remove(self._local, self._temporary_metadata)
        self._drop_staging()

    def _drop_staging(self) -> None:
        if self._staging != self.temporary:
            remove(self._local, self._staging, recursive=True)

    def _write_metadata(self) -> None:
        pyarrow, parquet = _pyarrow()
        table = pyarrow.table({name: pyarrow.array(self._metadata[name], getattr(pyarrow, kind)())
                               for name, kind in METADATA_COLUMNS})
        with self._local.open(self._temporary_metadata, "wb") as handle:
            parquet.write_table(table, handle)
            durable(handle)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingDependencyError("fxfeat.extract writes its metadata as parquet, which needs pyarrow.",
                                     hint="pip install 'fxfeat[extract]' (pyarrow and pandas).") from None
    return pyarrow, parquet
