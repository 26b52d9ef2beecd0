"""The file access of ``fxfeat.extract``'s data sources, behind one small seam: local files by default.

The sources never call ``open`` or ``os`` on the data themselves: they ask :func:`filesystem` for the filesystem of
a path and call its methods, which are named and behave as fsspec's (``exists``, ``isdir``, ``isfile``, ``find``,
``open``, ``cat_file``), so that an fsspec filesystem can serve ``s3://`` or ``https://`` data through the same
calls. Remote URLs are not read yet: :func:`filesystem` refuses them with a clear error.

Folders are walked as torchvision's ``ImageFolder`` walks them, following symbolic links to folders (a dataset
assembled from several disks); a link back to a folder that contains it is an error, not an endless walk.

Example:
    >>> import os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> os.makedirs(f"{root}/disk1/cats")
    >>> with open(f"{root}/disk1/cats/1.jpg", "wb") as handle:
    ...     _ = handle.write(b"bytes")
    >>> os.makedirs(f"{root}/data")
    >>> os.symlink(f"{root}/disk1/cats", f"{root}/data/cats")  # a class folder on another disk
    >>> files = filesystem(f"{root}/data")
    >>> [os.path.relpath(path, f"{root}/data") for path in files.find(f"{root}/data")]
    ['cats/1.jpg']
    >>> files.cat_file(f"{root}/data/cats/1.jpg", start=1, end=3)
    b'yt'
"""

from __future__ import annotations

import os
import re
from typing import IO, Any

from fxfeat.errors import DataSourceError

__all__ = ["LocalFiles", "filesystem", "is_url"]


class LocalFiles:
    """Local files through fsspec's method names (a small subset of ``fsspec.AbstractFileSystem``)."""

    protocol = "file"
    exists = staticmethod(os.path.exists)
    isdir = staticmethod(os.path.isdir)
    isfile = staticmethod(os.path.isfile)

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> IO:
        return open(path, mode, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes of ``path`` from ``start`` to ``end`` (the whole file by default)."""
        with open(path, "rb") as handle:
            if start:
                handle.seek(start)
            return handle.read() if end is None else handle.read(end - (start or 0))

    def find(self, root: str) -> list[str]:
        """Every file under ``root``, recursively, following links to folders (as ``os.walk(followlinks=True)``
        that ``ImageFolder`` uses), sorted; unreadable folders are passed over as ``os.walk`` does.

        Raises:
            DataSourceError: a link leads back to a folder that contains it (a cycle).
        """
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


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``scheme://...``, ``pipe:``) rather than a local path.

    Example:
        >>> is_url("s3://bucket/train-{000..009}.tar"), is_url("pipe:curl -s URL"), is_url("/data/images")
        (True, True, False)
    """
    return bool(re.match(r"[a-zA-Z][a-zA-Z0-9+.-]+://", path)) or path.startswith("pipe:")


def filesystem(path: str) -> LocalFiles:
    """The filesystem that reads ``path``: local files (fsspec's for URLs is the next step).

    Raises:
        DataSourceError: ``path`` is a remote URL, which fxfeat does not read yet.
    """
    if is_url(path):
        raise DataSourceError(f"the data {path!r} is a remote URL; fxfeat.extract reads local files only so far.",
                              hint="copy the data to a local disk (or mount it) and pass its path.")
    return LocalFiles()
