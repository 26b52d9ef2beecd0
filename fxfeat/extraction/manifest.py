"""The output directory of ``fxfeat.extract``: its manifest, which parts it holds, and reading it back.

``DIR/manifest.json`` holds the configuration (model fingerprint, preprocessing, features with shapes, dtypes and
``feature_info``, the data listing, ``shard_size``), every part's record (row range, count, per-file sha256 and
size, skipped images with reasons) and whether the run is complete. Records are written part by part (under
``DIR/.fxfeat/parts``, see :mod:`fxfeat.extraction.parts`) and merged into the manifest by rank 0 at the start and at
the end of a run. A rerun with the same configuration keeps the parts whose files match their record and redoes
the others; another configuration is refused, naming the first difference.

Example:
    >>> import tempfile
    >>> out = OutputDirectory(tempfile.mkdtemp())
    >>> out.prepare({"model": {"weights_sha256": "ab"}}, parts=3, overwrite=False, resume=True)
    >>> out.prepare({"model": {"weights_sha256": "cd"}}, parts=3, overwrite=False, resume=True)
    Traceback (most recent call last):
    ...
    fxfeat.errors.OutputDirectoryError: ... model.weights_sha256 is 'ab' there and 'cd' now.
    Hint: pass overwrite=True (--overwrite) to replace them, or write to another directory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import numpy as np

from fxfeat.errors import MissingDependencyError, OutputDirectoryError
from fxfeat.extraction.parts import METADATA, STATE, file_digest, part_name, record_path, write_json_atomically

__all__ = ["FORMAT", "OutputDirectory", "PartedArray", "load_features"]

FORMAT = "fxfeat-features/1"
MANIFEST = "manifest.json"


class OutputDirectory:
    """One extraction's directory. Only rank 0 calls :meth:`prepare` and :meth:`finish`; every rank calls
    :meth:`damaged_or_missing` for its share of the parts."""

    def __init__(self, path: str):
        self.path = os.fspath(path)

    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, MANIFEST)

    def read_manifest(self) -> dict[str, Any] | None:
        if not os.path.isfile(self.manifest_path):
            return None
        with open(self.manifest_path, encoding="utf-8") as handle:
            return json.load(handle)

    def prepare(self, config: dict[str, Any], parts: int, overwrite: bool, resume: bool) -> None:
        """Check that the directory can take this run (empty, or this configuration's earlier run), clear it on
        ``overwrite``, drop temporary files of interrupted runs, and write the manifest's start.

        Raises:
            OutputDirectoryError: the directory holds other files, or an earlier run of another configuration,
                or (``resume=False``) any earlier run.
        """
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OutputDirectoryError(f"The output {self.path} is a file, not a directory.",
                                       hint="pass a new or empty directory.")
        manifest = self.read_manifest()
        ours = manifest is not None or os.path.isdir(os.path.join(self.path, STATE))
        if os.path.isdir(self.path) and os.listdir(self.path):
            if not ours:
                raise OutputDirectoryError(
                    f"The output directory {self.path} holds other files and no fxfeat manifest.",
                    hint="write the features to a new or empty directory.")
            if overwrite:
                self._clear()
                manifest = None
            elif manifest is not None and manifest.get("config") != config:
                where, there, now = _first_difference(manifest.get("config"), config)
                raise OutputDirectoryError(
                    f"{self.path} holds features of another configuration: {where} is {there!r} there and "
                    f"{now!r} now.",
                    hint="pass overwrite=True (--overwrite) to replace them, or write to another directory.")
            elif not resume:
                raise OutputDirectoryError(f"{self.path} holds an earlier extraction and resume=False.",
                                           hint="pass resume=True to finish it, or overwrite=True to replace it.")
        shutil.rmtree(os.path.join(self.path, STATE, "tmp"), ignore_errors=True)
        os.makedirs(os.path.join(self.path, STATE, "parts"), exist_ok=True)
        if manifest is None or overwrite:  # a rerun keeps its manifest until its end, when it is rewritten
            self._write_manifest(config, parts, complete=False, started=time.time())

    def _clear(self) -> None:
        for name in os.listdir(self.path):
            path = os.path.join(self.path, name)
            if name == MANIFEST or name == STATE or os.path.isdir(path) and _holds_only_parts(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            else:
                raise OutputDirectoryError(f"{self.path} holds {name!r}, which fxfeat did not write; overwrite "
                                           "only replaces an fxfeat output.", hint="move it, or use another directory.")

    def records(self) -> dict[int, dict[str, Any]]:
        """Every part's record, by part number."""
        folder = os.path.join(self.path, STATE, "parts")
        found = {}
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if name.startswith("part-") and name.endswith(".json"):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    record = json.load(handle)
                found[record["part"]] = record
        return found

    def damaged_or_missing(self, parts: list[int]) -> list[int]:
        """Of ``parts``, those without a record or whose files do not match it (missing, another size or
        checksum). A damaged part's record is removed, so that the part counts only once redone."""
        records = self.records()
        redo = []
        for part in parts:
            record = records.get(part)
            if record is None:
                redo.append(part)
            elif not self.intact(record):
                os.unlink(record_path(self.path, part))
                redo.append(part)
        return redo

    def intact(self, record: dict[str, Any]) -> bool:
        for relative, described in record["files"].items():
            path = os.path.join(self.path, relative)
            if not os.path.isfile(path) or os.path.getsize(path) != described["bytes"]:
                return False
            if file_digest(path) != described["sha256"]:
                return False
        return True

    def finish(self, config: dict[str, Any], parts: int) -> dict[str, Any]:
        """Merge the part records into the manifest; complete when every part is recorded."""
        started = (self.read_manifest() or {}).get("started")
        return self._write_manifest(config, parts, complete=None, started=started)

    def _write_manifest(self, config: dict[str, Any], parts: int, complete: bool | None,
                        started: float | None) -> dict[str, Any]:
        from fxfeat import __version__

        records = [record for part, record in sorted(self.records().items()) if part < parts]
        done = len(records) == parts if complete is None else complete
        manifest = {
            "format": FORMAT, "fxfeat_version": __version__, "complete": done, "started": started,
            "updated": time.time(), "parts_total": parts, "parts_done": len(records),
            "images": sum(record["count"] for record in records),
            "skipped": [entry for record in records for entry in record["skipped"]],
            "config": config, "parts": records,
        }
        write_json_atomically(self.manifest_path, manifest)
        return manifest


def _holds_only_parts(folder: str) -> bool:
    return all(name.startswith("part-") and name.endswith((".npy", ".parquet")) for name in os.listdir(folder))


def _first_difference(there: Any, now: Any, where: str = "") -> tuple[str, Any, Any]:
    if isinstance(there, dict) and isinstance(now, dict):
        for key in [*there, *(key for key in now if key not in there)]:
            if there.get(key) != now.get(key):
                return _first_difference(there.get(key), now.get(key), f"{where}.{key}" if where else key)
    return where or "the configuration", there, now


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


def load_features(path: str, *, verify: bool = False) -> tuple[dict[str, np.ndarray | PartedArray], Any]:
    """Read an extraction back: per feature, every row in order, memory-mapped (the part's ``numpy.memmap`` when
    the extraction is one part, else a :class:`PartedArray` over the parts' memory maps), and the metadata as a
    pandas DataFrame in the same row order (``id`` is the image's index in the data source).

    Args:
        path: the directory ``fxfeat.extract`` wrote.
        verify: check every file's sha256 against the manifest (else its size only).

    Raises:
        OutputDirectoryError: no manifest, an incomplete run, or a part whose files do not match their record.
        MissingDependencyError: pandas or pyarrow is not installed.

    Example (a run of ``fxfeat.extract``'s own example writes such a directory)::

        arrays, metadata = load_features("features/")
        arrays["pooled"].shape, list(metadata.columns)   # (1000, 2048), ['id', 'path', 'label', 'width', 'height']
    """
    directory = OutputDirectory(path)
    manifest = directory.read_manifest()
    if manifest is None or manifest.get("format") != FORMAT:
        raise OutputDirectoryError(f"{path} is not an fxfeat extraction (no {MANIFEST} of format {FORMAT}).",
                                   hint="pass the directory fxfeat.extract(..., out=DIR) wrote.")
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
    for record in records:
        damaged = [relative for relative, described in record["files"].items()
                   if not os.path.isfile(os.path.join(path, relative))
                   or os.path.getsize(os.path.join(path, relative)) != described["bytes"]
                   or verify and file_digest(os.path.join(path, relative)) != described["sha256"]]
        if damaged:
            raise OutputDirectoryError(f"{path}: {', '.join(damaged)} do not match the manifest (missing, "
                                       "truncated or changed).", hint="run the same fxfeat extract command again: "
                                       "it redoes damaged parts.")
    arrays: dict[str, np.ndarray | PartedArray] = {}
    for name in manifest["config"]["features"]:
        pieces = [np.load(os.path.join(path, name, f"{part_name(record['part'])}.npy"), mmap_mode="r")
                  for record in records]
        arrays[name] = pieces[0] if len(pieces) == 1 else PartedArray(pieces)
    frames = [pandas.read_parquet(os.path.join(path, METADATA, f"{part_name(record['part'])}.parquet"))
              for record in records]
    return arrays, pandas.concat(frames, ignore_index=True)
