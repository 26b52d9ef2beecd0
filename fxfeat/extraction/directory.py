"""The writer's side of an output directory: checking it can take a run, finding the parts still to do, merging
the parts' records into the manifest.

Records are written part by part (:mod:`fxfeat.extraction.parts`) and merged into the manifest by rank 0 at the
start and at the end of a run. A rerun with the same configuration keeps the parts whose files match their record
and redoes the others; another configuration is refused, naming the first difference. What the files are and
what the manifest holds is :mod:`fxfeat.extraction.format`'s.

Example:
    >>> import tempfile
    >>> out = OutputDirectory(tempfile.mkdtemp())
    >>> run = out.prepare({"model": {"weights_sha256": "ab"}}, parts=3, overwrite=False, resume=True)
    >>> out.prepare({"model": {"weights_sha256": "cd"}}, parts=3, overwrite=False, resume=True)
    Traceback (most recent call last):
    ...
    fxfeat.errors.OutputDirectoryError: ... model.weights_sha256 is 'ab' there and 'cd' now.
    Hint: pass overwrite=True (--overwrite) to replace them, or write to another directory.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from fxfeat.errors import OutputDirectoryError
from fxfeat.extraction.filesystem import names, output_filesystem, remove, write_file
from fxfeat.extraction.format import (
    FORMAT,
    LOCK,
    MANIFEST,
    RECORDS,
    STATE,
    TEMPORARY,
    check_readable,
    damaged_files,
    first_difference,
    manifest_of,
    read_manifest,
    record_file,
    recorded_configuration,
)

__all__ = ["OutputDirectory"]


class OutputDirectory:
    """One extraction's directory, as its writer sees it. Only rank 0 calls :meth:`prepare` and :meth:`finish`;
    every rank calls :meth:`damaged_or_missing` for its share of the parts."""

    def __init__(self, path: str | os.PathLike, files: Any = None):
        self.path = os.fspath(path)
        self.files = files if files is not None else output_filesystem(self.path)  # fsspec's, by the path

    def _join(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def read_manifest(self) -> dict[str, Any] | None:
        return read_manifest(self.path, self.files)

    def prepare(self, config: dict[str, Any], parts: int, overwrite: bool, resume: bool) -> str:
        """Check that the directory can take this run (empty, or this configuration's earlier run), clear it on
        ``overwrite``, drop temporary files of interrupted runs, and write the manifest's start. Returns a name
        for this run, unique to it, that its processes' temporary folders start with.

        Raises:
            OutputDirectoryError: the directory holds other files, an earlier run of another configuration or of
                a format this fxfeat does not read, or (``resume=False``) any earlier run.
        """
        files = self.files
        if files.exists(self.path) and not files.isdir(self.path):
            raise OutputDirectoryError(f"The output {self.path} is a file, not a directory.",
                                       hint="pass a new or empty directory.")
        manifest = self.read_manifest()
        entries = self._entries()
        ours = manifest is not None or STATE in entries
        if entries:
            if not ours:
                raise OutputDirectoryError(
                    f"The output directory {self.path} holds other files and no fxfeat manifest.",
                    hint="write the features to a new or empty directory.")
            if overwrite:
                self._clear()
                manifest = None
            else:
                self._check_resumable(manifest, config, resume)
        remove(files, self._join(TEMPORARY), recursive=True)
        files.makedirs(self._join(RECORDS), exist_ok=True)
        if manifest is None:  # a rerun keeps its manifest until its end, when it is rewritten
            self._write_manifest(config, parts, complete=False, started=time.time())
        return uuid.uuid4().hex[:12]

    def _check_resumable(self, manifest: dict[str, Any] | None, config: dict[str, Any], resume: bool) -> None:
        if manifest is not None:
            check_readable(manifest, self.path)
        difference = first_difference(recorded_configuration(manifest), config) if manifest is not None else None
        if difference is not None:
            where, there, now = difference
            older = f" (written in format {manifest['format']}; this fxfeat writes {FORMAT})" \
                if manifest["format"] != FORMAT else ""
            raise OutputDirectoryError(
                f"{self.path} holds features of another configuration{older}: {where} is {there!r} there and "
                f"{now!r} now.",
                hint="pass overwrite=True (--overwrite) to replace them, or write to another directory.")
        if not resume:
            raise OutputDirectoryError(f"{self.path} holds an earlier extraction and resume=False.",
                                       hint="pass resume=True to finish it, or overwrite=True to replace it.")

    def _entries(self) -> list[str]:
        """The directory's names, without a state folder that holds only the lock: a new directory a run has
        locked is still empty."""
        entries = names(self.files, self.path)
        if STATE in entries and all(_is_lock(name) for name in names(self.files, self._join(STATE))):
            entries.remove(STATE)
        return entries

    def _clear(self) -> None:
        for name in names(self.files, self.path):
            path = self._join(name)
            if name == STATE:
                for inside in names(self.files, path):
                    if not _is_lock(inside):  # the run's own lock stays held (fxfeat.extraction.lock)
                        self.files.rm(f"{path}/{inside}", recursive=True)
            elif name == MANIFEST or self.files.isdir(path) and self._holds_only_parts(path):
                self.files.rm(path, recursive=True)
            else:
                raise OutputDirectoryError(f"{self.path} holds {name!r}, which fxfeat did not write; overwrite "
                                           "only replaces an fxfeat output.", hint="move it, or use another directory.")

    def _holds_only_parts(self, folder: str) -> bool:
        return all(name.startswith("part-") and name.endswith((".npy", ".parquet"))
                   for name in names(self.files, folder))

    def records(self) -> dict[int, dict[str, Any]]:
        """Every part's record, by part number."""
        found = {}
        folder = self._join(RECORDS)
        for name in names(self.files, folder):
            if name.startswith("part-") and name.endswith(".json"):
                with self.files.open(f"{folder}/{name}", "rb") as handle:
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
            elif damaged_files(self.files, self.path, record, checksums=True):
                remove(self.files, self._join(record_file(part)))
                redo.append(part)
        return redo

    def finish(self, config: dict[str, Any], parts: int) -> dict[str, Any]:
        """Merge the part records into the manifest; complete when every part is recorded."""
        started = (self.read_manifest() or {}).get("started")
        return self._write_manifest(config, parts, complete=None, started=started)

    def _write_manifest(self, config: dict[str, Any], parts: int, complete: bool | None,
                        started: float | None) -> dict[str, Any]:
        records = [record for part, record in sorted(self.records().items()) if part < parts]
        manifest = manifest_of(config, parts, records, complete, started)
        write_file(self.files, self._join(MANIFEST), json.dumps(manifest, indent=1).encode())
        return manifest


def _is_lock(name: str) -> bool:
    """Whether ``name`` in the state folder is the lock's (the lock file, its holder file and the holder file's
    temporary copies)."""
    return name.startswith(LOCK.rpartition("/")[2])
