"""WebDataset's tar shards: the samples a shard holds (grouped by ``webdataset``'s own rule) and the shards a brace
pattern names (``braceexpand``). :class:`~fxfeat.extraction.sources.TarSource` reads shards through these.

Example:
    >>> import io, tarfile, tempfile
    >>> shard = f"{tempfile.mkdtemp()}/shard-00.tar"
    >>> with tarfile.open(shard, "w") as archive:
    ...     for name, content in (("a.jpg", b"image"), ("a.cls", b"3"), ("b.png", b"other")):
    ...         info = tarfile.TarInfo(name)
    ...         info.size = len(content)
    ...         archive.addfile(info, io.BytesIO(content))
    >>> from fxfeat.extraction.files import filesystem
    >>> list(tar_samples(filesystem(shard), shard, (".jpg", ".png")))
    [('a', (512, 5), 3), ('b', (2560, 5), None)]
"""

from __future__ import annotations

import importlib
import re
import tarfile
from collections.abc import Iterator
from typing import Any

from fxfeat.errors import DataSourceError, MissingDependencyError
from fxfeat.extraction.files import PipeReader, is_pipe

__all__ = ["expand_braces", "library", "tar_samples"]

_LABEL_SUFFIXES = ("cls", "cls.txt", "label", "cls2")


def tar_samples(files: Any, shard: str, image_extensions: tuple[str, ...]) -> Iterator[tuple[str, tuple[int, int],
                                                                                        int | None]]:
    """``(key, (offset, size) of the image, label)`` per sample of one shard (a file of ``files``, or a ``pipe:``
    command's output), in member order; a sample's image is its first file with one of ``image_extensions``."""
    group_by_keys = library("webdataset.tariterators", "webdataset", "to read tar shards").group_by_keys

    def entries(archive: tarfile.TarFile):  # webdataset's file records, the image's bytes replaced by its place
        for member in archive:
            if member.isfile():
                suffix = member.name.rpartition("/")[2].partition(".")[2].lower()
                data = archive.extractfile(member).read() if suffix in _LABEL_SUFFIXES else \
                    (member.offset_data, member.size)
                yield {"fname": member.name, "data": data, "__url__": shard}

    pipe = PipeReader(shard) if is_pipe(shard) else None
    try:  # a command's output is a stream (tarfile's "r|"); a file is listed from its headers, skipping the data
        with pipe.stream() if pipe else files.open(shard, "rb") as handle, \
                tarfile.open(fileobj=handle, mode="r|" if pipe else "r:") as archive:
            for sample in group_by_keys(entries(archive)):
                image = next((suffix for suffix in sample if "." + suffix in image_extensions), None)
                if image is not None:
                    label = next((sample[suffix] for suffix in _LABEL_SUFFIXES if suffix in sample), None)
                    yield sample["__key__"], sample[image], _tar_label(label)
    except tarfile.TarError as error:
        raise DataSourceError(f"{shard} is not a readable tar archive ({error}).",
                              hint="shards are uncompressed tar files, as WebDataset writes them.") from None
    except ValueError as error:  # webdataset's grouping: one sample holds two files of one extension
        raise DataSourceError(f"the shard {shard} is not laid out as WebDataset's samples ({error.args[0]}).",
                              hint="each sample's files are consecutive and share the name before the first dot "
                              "(sample0001.jpg, sample0001.cls), one file per extension.") from None
    finally:
        if pipe is not None:
            pipe.close()


def _tar_label(data: bytes | None) -> int | None:
    text = data.decode(errors="replace").strip() if data is not None else ""
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def expand_braces(pattern: str) -> list[str]:
    """The paths a WebDataset brace pattern names (``braceexpand``): ``{000..012}`` (zero-padded ranges) and
    ``{a,b}``.

    Example:
        >>> expand_braces("train-{00..02}.tar"), expand_braces("{a,b}-{1..2}.tar")
        (['train-00.tar', 'train-01.tar', 'train-02.tar'], ['a-1.tar', 'a-2.tar', 'b-1.tar', 'b-2.tar'])

    Raises:
        DataSourceError: the braces do not pair up.
    """
    braceexpand = library("braceexpand", "braceexpand", "to expand shard patterns")
    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise DataSourceError(f"the shard pattern {pattern!r} has unbalanced braces.",
                              hint="each '{' has its '}': 'train-{000..099}.tar' (a range) or "
                              "'{train,val}-000.tar' (a list).") from None



def library(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"fxfeat.extract uses {package} {purpose}, and it is not installed.",
                                     hint=f"pip install 'fxfeat[extract]' (or pip install {package}).") from None
