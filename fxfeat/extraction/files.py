"""The file access of ``fxfeat.extract``'s data sources: fsspec's filesystems, and ``pipe:`` commands.

A source asks :func:`filesystem` for the fsspec filesystem of a path or URL (``fsspec.core.url_to_fs``: local
paths, ``https://``, ``s3://``, ``gs://``, ``memory://``, chained URLs such as ``simplecache::https://...``) and calls
its methods (``isdir``, ``isfile``, ``open``, ``cat_file`` with a byte range) with the URL itself. A missing protocol
package is a :class:`~fxfeat.MissingDependencyError` naming it; :func:`unreachable` turns a failed read into a
:class:`~fxfeat.DataSourceError` with a hint.

:func:`find` walks a folder. On local disks it follows symbolic links to folders as torchvision's ``ImageFolder``
(``os.walk(followlinks=True)``) does, and a link back to a folder that contains it is an error, not an endless walk;
elsewhere it is the filesystem's own ``find``.

``pipe:CMD`` (WebDataset's way of naming a shard by the command that prints it, ``pipe:curl -s URL``) is a stream
without random access: :class:`PipeReader` reads it forward, skipping what it is not asked for, and runs the command
again from the start when asked for bytes behind it.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(f"{root}/disk1/cats")
    >>> with open(f"{root}/disk1/cats/1.jpg", "wb") as handle:
    ...     _ = handle.write(b"bytes")
    >>> os.makedirs(f"{root}/data")
    >>> os.symlink(f"{root}/disk1/cats", f"{root}/data/cats")  # a class folder on another disk
    >>> files = filesystem(f"{root}/data")
    >>> [os.path.relpath(path, f"{root}/data") for path in find(files, f"{root}/data")]
    ['cats/1.jpg']
    >>> files.cat_file(f"{root}/data/cats/1.jpg", start=1, end=3)
    b'yt'
    >>> PipeReader(f"pipe:cat {root}/data/cats/1.jpg").read(2, 3)
    b'tes'
"""

from __future__ import annotations

import os
import posixpath
import re
import sys
from typing import Any

from fxfeat.errors import DataSourceError, MissingDependencyError

__all__ = ["PipeReader", "filesystem", "find", "is_file", "is_local", "is_pipe", "is_url", "join", "parent",
           "read_errors", "unreachable"]


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://...``, a chained ``a::b://``, ``pipe:``) rather than a local path.

    Example:
        >>> is_url("s3://bucket/train-{000..009}.tar"), is_url("pipe:curl -s URL"), is_url("/data/images")
        (True, True, False)
    """
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+(://|::)", path)) or is_pipe(path)


def is_pipe(path: str) -> bool:
    return path.startswith("pipe:")


def filesystem(path: str, storage_options: dict[str, Any] | None = None) -> Any:
    """The fsspec filesystem that reads ``path`` (``fsspec.core.url_to_fs``), with the options of its protocol in
    ``storage_options`` (``{"s3": {"endpoint_url": ...}}``; a chained URL takes them all, by protocol, as fsspec's
    ``url_to_fs`` does).

    Raises:
        MissingDependencyError: the package of the URL's protocol (``s3fs``, ``gcsfs``, ``aiohttp``...) is missing.
        DataSourceError: fsspec knows no such protocol.
    """
    import fsspec.core

    options = storage_options or {}
    protocol = fsspec.core.split_protocol(path)[0] or "file"
    kwargs = options if "::" in path else options.get(protocol, {})
    try:
        return fsspec.core.url_to_fs(path, **kwargs)[0]
    except ImportError as error:
        package = _package_named(str(error))
        raise MissingDependencyError(
            f"reading {path!r} needs fsspec's {protocol!r} filesystem, whose package is not installed ({error}).",
            hint=f"pip install {package or protocol + ' support for fsspec'}"
                 + (" (or pip install 'fxfeat[extract]')" if protocol in ("http", "https") else "") + ".") from None
    except ValueError as error:
        raise DataSourceError(f"{path!r} names a protocol fsspec does not know ({error}).",
                              hint="use a local path or a URL fsspec reads: https://, s3://, gs://...") from None


def _package_named(message: str) -> str | None:
    """The package fsspec's import error asks for ("Install s3fs to access S3")."""
    found = re.search(r"[Ii]nstall (?:the )?['\"]?([A-Za-z0-9_.\-]+)", message) or re.search(r"module named '(\w+)'",
                                                                                            message)
    return found.group(1) if found else None


def is_local(files: Any) -> bool:
    """Whether ``files`` is fsspec's local filesystem (paths numpy can map, ``os`` can rename)."""
    protocol = files.protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def is_file(files: Any, path: str) -> bool:
    """Whether ``path`` is a file of ``files``. A server that does not answer raises its error (fsspec's HTTP
    ``isfile`` says ``False``, as for a missing file)."""
    try:
        return files.info(path)["type"] == "file"
    except FileNotFoundError as error:
        cause = error.__cause__
        if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):  # a refused connection
            raise cause from None
        return False


def parent(path: str) -> str:
    """The folder holding ``path`` (a local path made absolute, a URL kept a URL)."""
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def join(base: str, entry: str) -> str:
    """``entry`` of a list file in ``base``: a URL or an absolute path as it is, else relative to ``base``."""
    if is_url(entry) or os.path.isabs(entry) and not is_url(base):
        return entry
    return posixpath.join(base, entry) if is_url(base) else os.path.join(base, entry)


def find(files: Any, root: str) -> list[str]:
    """Every file under ``root``, recursively, sorted, as paths that start with ``root``. On local disks links to
    folders are followed (as ``os.walk(followlinks=True)`` that ``ImageFolder`` uses) and unreadable folders passed
    over as ``os.walk`` does.

    Raises:
        DataSourceError: a link leads back to a folder that contains it (a cycle).
    """
    if not is_local(files):
        stripped = files._strip_protocol(root).rstrip("/")
        return sorted(root.rstrip("/") + path[len(stripped):] for path in files.find(root))
    found = []
    pending = [(root, frozenset({_identity(root)}))]
    while pending:
        folder, ancestors = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                is_folder = entry.is_dir()
            except OSError:
                continue
            if not is_folder:
                if entry.is_file():  # a broken link is neither
                    found.append(entry.path)
                continue
            identity = _identity(entry.path)
            if identity in ancestors:
                raise DataSourceError(
                    f"the folder {root} has a cycle of symbolic links: {entry.path} leads to "
                    f"{os.path.realpath(entry.path)}, a folder that contains it.",
                    hint="remove or retarget that link (links to folders elsewhere are followed, as torchvision's "
                    "ImageFolder follows them), or pass a folder whose links do not lead back into it.")
            pending.append((entry.path, ancestors | {identity}))
    return sorted(found)


def _identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def read_errors() -> tuple[type[Exception], ...]:
    """The exceptions a failed read raises: ``OSError`` (fsspec's, a missing file, a refused connection) and, when
    fsspec's HTTP filesystem is in use, aiohttp's (an HTTP error status)."""
    aiohttp = sys.modules.get("aiohttp")
    return (OSError, aiohttp.ClientError) if aiohttp is not None else (OSError,)


def unreachable(location: str, error: Exception) -> DataSourceError:
    """The error of data that could not be read: a host that does not answer, a refused request, a missing file."""
    return DataSourceError(f"could not read the data {location!r}: {type(error).__name__}: {error}",
                           hint="check the URL (open it with fsspec.open or curl), the network and the credentials "
                           "(fsspec's options: extract(..., storage_options={'s3': {...}}), or on the command line "
                           "fsspec's configuration, e.g. FSSPEC_S3_ENDPOINT_URL).")


class PipeReader:
    """The output of a ``pipe:CMD`` command (webdataset's ``gopen``), read forward: :meth:`read` at an offset skips
    to it, or runs the command again from the start when the offset lies behind what was read."""

    def __init__(self, url: str):
        self.url, self._stream, self.position = url, None, 0

    def stream(self) -> Any:
        """The command's output from its start (a new run of the command)."""
        from webdataset.gopen import gopen

        self.close()
        self._stream, self.position = gopen(self.url, "rb"), 0
        return self._stream

    def read(self, offset: int, size: int) -> bytes:
        if self._stream is None or offset < self.position:
            self.stream()
        while self.position < offset:
            skipped = len(self._stream.read(min(offset - self.position, 1 << 20)))
            if not skipped:
                raise DataSourceError(f"the command {self.url!r} stopped at byte {self.position}, before {offset}.",
                                      hint="the shard changed since it was listed: run the command alone to check.")
            self.position += skipped
        data = self._stream.read(size)
        self.position += len(data)
        return data

    def close(self) -> None:
        """Stop the command (it may not have written everything: that is no error here)."""
        if self._stream is not None:
            self._stream.proc.kill()
            self._stream.stream.close()
            self._stream.proc.wait()
            self._stream = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url, "_stream": None, "position": 0}  # a running command does not travel to the workers
