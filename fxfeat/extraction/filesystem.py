"""Every file operation of the extraction's writer and reader, on fsspec's filesystems.

The writer (:mod:`~fxfeat.extraction.directory`, :mod:`~fxfeat.extraction.parts`) and the reader
(:mod:`~fxfeat.extraction.reader`) never call ``os`` or ``open`` on the output themselves: they call the methods of
the fsspec filesystem :func:`output_filesystem` gives for the output's path or URL (local paths, ``memory://``,
``s3://``, ``gs://``...), with paths under the output directory, and the few operations whose guarantees differ
between filesystems through the functions here:

- :func:`write_file` writes a small file whole: on local disks (and mounted network filesystems) to a temporary
  name, flushed to the disk, then renamed over the file, so that readers see the old file or the new one; on an
  object store an upload, which is atomic per object.
- :func:`move` is an atomic rename on local disks; on an object store a copy then a delete (readers may see the
  file at both names for a moment, never a partial one).
- :func:`remove` removes a file or folder that may already be gone (another process may have removed it).

On an object store nothing renames a folder atomically: there, a part's record, written last after every file it
names, is what commits the part (:mod:`~fxfeat.extraction.parts`).

Example:
    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> files = output_filesystem(root)
    >>> write_file(files, f"{root}/state/a.json", b"{}")
    >>> names(files, f"{root}/state"), files.size(f"{root}/state/a.json"), digest(files, f"{root}/state/a.json")[:8]
    (['a.json'], 2, '44136fa3')
    >>> remove(files, f"{root}/state", recursive=True)
    >>> remove(files, f"{root}/state/a.json")  # already gone: no error
    >>> files.exists(f"{root}/state")
    False
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from typing import IO, TYPE_CHECKING, Any

from fxfeat.errors import DataSourceError, OutputDirectoryError
from fxfeat.extraction.files import filesystem, is_local

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["digest", "durable", "is_local", "local_files", "move", "names", "output_filesystem", "remove",
           "write_file"]


def output_filesystem(path: str, storage_options: dict[str, Any] | None = None) -> AbstractFileSystem:
    """The fsspec filesystem of the output directory ``path`` (a path or a URL; ``storage_options`` by protocol,
    ``{"s3": {"endpoint_url": ...}}``).

    Raises:
        MissingDependencyError: the package of the URL's protocol is not installed.
        OutputDirectoryError: fsspec knows no such protocol.
    """
    try:
        return filesystem(path, storage_options)
    except DataSourceError as error:
        raise OutputDirectoryError(error.message, hint=error.hint) from None


def local_files() -> AbstractFileSystem:
    """fsspec's filesystem of this machine's files."""
    return filesystem("/")


def write_file(files: AbstractFileSystem, path: str, value: bytes) -> None:
    """Write ``value`` as the file ``path`` at once: readers see the old file or the new one, never a part."""
    if not is_local(files):
        files.pipe_file(path, value)  # an object store's upload: atomic per object
        return
    path = files._strip_protocol(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp.{uuid.uuid4().hex[:12]}"
    with open(temporary, "wb") as handle:
        handle.write(value)
        durable(handle)
    os.replace(temporary, path)


def move(files: AbstractFileSystem, source: str, destination: str) -> None:
    """Move the file ``source`` over ``destination``: an atomic rename on local disks, a copy and a delete on an
    object store."""
    if is_local(files):
        os.replace(files._strip_protocol(source), files._strip_protocol(destination))
    else:
        files.mv(source, destination)


def remove(files: AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """Remove the file (or, ``recursive``, the folder) ``path``; one already gone is no error."""
    try:
        if recursive and files.isdir(path):
            files.rm(path, recursive=True)
        else:
            files.rm_file(path)
    except FileNotFoundError:
        pass


def names(files: AbstractFileSystem, folder: str) -> list[str]:
    """The names in ``folder``, sorted (none where it does not exist), as they are now (an object store's listing
    is asked again: another process may have written since)."""
    files.invalidate_cache(folder)
    if not files.isdir(folder):
        return []
    return sorted(path.rstrip("/").rpartition("/")[2] for path in files.ls(folder, detail=False))


def durable(handle: IO) -> None:
    """Flush what was written through ``handle`` to the disk (before the file is renamed into place); a file
    without a descriptor (an object store's upload) is durable once closed."""
    handle.flush()
    try:
        descriptor = handle.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return
    os.fsync(descriptor)


def digest(files: AbstractFileSystem, path: str) -> str:
    """sha256 of a file's bytes."""
    hashed = hashlib.sha256()
    with files.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            hashed.update(block)
    return hashed.hexdigest()
