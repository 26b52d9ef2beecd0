"""Writing one part of an extraction: a ``.npy`` file per feature and a ``.parquet`` metadata file, made visible
all together or not at all.

Rows stream into temporary files under ``DIR/.fxfeat/tmp`` as batches arrive (a part never sits in memory: a
pyramid of maps for 10,000 images is gigabytes). On :meth:`PartWriter.commit` every file is flushed to disk,
hashed, renamed into place (``DIR/<feature>/part-00000.npy``, ``DIR/metadata/part-00000.parquet``), and then the
part's record is written (``DIR/.fxfeat/parts/part-00000.json``): the record is what says a part exists, so a
crash before it leaves a part that the next run redoes, never one that counts.

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

import hashlib
import json
import os
import time
from typing import Any

import numpy as np

from fxfeat.errors import MissingDependencyError

__all__ = ["METADATA", "PartWriter", "file_digest", "part_name", "record_path", "write_json_atomically"]

METADATA = "metadata"
STATE = ".fxfeat"  # fxfeat's own files in the output: part records and temporary files


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def record_path(out: str, part: int) -> str:
    return os.path.join(out, STATE, "parts", f"{part_name(part)}.json")


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: str, value: Any) -> None:
    """Write JSON to a temporary file, flush it to disk, then rename it over ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class _NpyStream:
    """A ``.npy`` file written row block by row block; its header, reserved for ``capacity`` rows, gets the real
    row count on :meth:`close` (the header's padding absorbs the shorter number)."""

    def __init__(self, path: str, row_shape: tuple[int, ...], dtype: np.dtype, capacity: int):
        self.path, self.row_shape, self.dtype, self.rows = path, tuple(row_shape), np.dtype(dtype), 0
        self._header_length = len(self._header(capacity))
        self._file = open(path, "wb")
        self._file.write(self._header(capacity))

    def _header(self, rows: int, length: int | None = None) -> bytes:
        text = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                     "shape": (rows, *self.row_shape)})
        prefix = 10  # magic, version, header length
        size = length - prefix if length else -(-(prefix + len(text) + 1) // 64) * 64 - prefix
        text = text.ljust(size - 1) + "\n"
        return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")

    def write(self, array: np.ndarray) -> None:
        if array.shape[1:] != self.row_shape or array.dtype != self.dtype:
            raise ValueError(f"rows of shape {array.shape[1:]} and dtype {array.dtype} written to a part of rows "
                             f"{self.row_shape} {self.dtype} (an input of another size?)")
        self._file.write(np.ascontiguousarray(array).data)
        self.rows += len(array)

    def close(self) -> None:
        self._file.seek(0)
        self._file.write(self._header(self.rows, self._header_length))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()
        os.unlink(self.path)


class PartWriter:
    """The files of one part, written as batches arrive and made visible by :meth:`commit`.

    Args:
        out: the output directory.
        part: the part's number.
        rows: ``(first, stop)`` dataset indices of the part.
        features: per feature name, ``(row shape, numpy dtype)``.
        tag: distinguishes the temporary files of concurrent writers (the rank).
    """

    def __init__(self, out: str, part: int, rows: tuple[int, int], features: dict[str, tuple[tuple, Any]],
                 tag: str = "0"):
        self.out, self.part, self.first, self.stop = out, part, rows[0], rows[1]
        self.started = time.perf_counter()
        temporary = os.path.join(out, STATE, "tmp")
        os.makedirs(temporary, exist_ok=True)
        capacity = rows[1] - rows[0]
        self._arrays = {name: _NpyStream(os.path.join(temporary, f"{part_name(part)}.{tag}.{name}.npy"), shape,
                                         dtype, capacity) for name, (shape, dtype) in features.items()}
        self._metadata: dict[str, list] = {"id": [], "path": [], "label": [], "width": [], "height": []}
        self._skipped: list[dict[str, Any]] = []
        self._temporary_metadata = os.path.join(temporary, f"{part_name(part)}.{tag}.{METADATA}.parquet")

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
            files[f"{name}/{part_name(self.part)}.npy"] = stream.path
        self._write_metadata()
        files[f"{METADATA}/{part_name(self.part)}.parquet"] = self._temporary_metadata
        described = {}
        for relative, temporary in files.items():
            described[relative] = {"sha256": file_digest(temporary), "bytes": os.path.getsize(temporary)}
            final = os.path.join(self.out, relative)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.replace(temporary, final)
        record = {"part": self.part, "rows": [self.first, self.stop], "count": len(self._metadata["id"]),
                  "files": described, "skipped": self._skipped,
                  "seconds": round(time.perf_counter() - self.started, 3), "run": run}
        write_json_atomically(record_path(self.out, self.part), record)
        return record

    def abort(self) -> None:
        """Drop the part's temporary files (an interrupted run)."""
        for stream in self._arrays.values():
            stream.abort()
        if os.path.exists(self._temporary_metadata):
            os.unlink(self._temporary_metadata)

    def _write_metadata(self) -> None:
        pyarrow, parquet = _pyarrow()
        columns = self._metadata
        table = pyarrow.table({
            "id": pyarrow.array(columns["id"], pyarrow.int64()),
            "path": pyarrow.array(columns["path"], pyarrow.string()),
            "label": pyarrow.array(columns["label"], pyarrow.int64()),
            "width": pyarrow.array(columns["width"], pyarrow.int32()),
            "height": pyarrow.array(columns["height"], pyarrow.int32()),
        })
        parquet.write_table(table, self._temporary_metadata)
        with open(self._temporary_metadata, "rb+") as handle:
            os.fsync(handle.fileno())


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingDependencyError("fxfeat.extract writes its metadata as parquet, which needs pyarrow.",
                                     hint="pip install 'fxfeat[extract]' (pyarrow and pandas).") from None
    return pyarrow, parquet
