"""Where ``fxfeat.extract`` reads images: a folder, a list file, WebDataset-style tar shards, or a map-style dataset.

Every source kind is a small :class:`ImageSource` subclass behind one interface:

- **open**: the class method ``accepts(data)`` says whether the kind reads ``data``; :func:`open_source` asks the
  kinds in :data:`SOURCE_KINDS` in order and builds the first that does (:func:`register_source` adds a kind);
- **list**: building it lists the items once, in the main process: a fixed order (the dataset order that parts are
  cut from) with per item a key (``keys``), a label (``labels``) and the class names (``classes``);
- **describe**: :meth:`ImageSource.describe` is what identifies the listing in the manifest;
- and ``load(index)`` reads one item by its index in the DataLoader workers (random access: a resumed run reads
  only the parts still to do), through ``read(index)``, the item's file bytes, for the kinds whose items are files.

The kinds:

- :class:`FolderSource`: every image file under a folder, recursively, sorted by path; files in a first-level
  subfolder are labelled by that subfolder, and links to folders are followed, as torchvision's ``ImageFolder`` does.
- :class:`ListSource`: a ``.txt`` file with one path per line, or a ``.csv``/``.tsv`` file with a ``path`` column
  (and optionally ``label``); relative paths are relative to the list file.
- :class:`TarSource`: WebDataset-style shards (``train-{000..099}.tar``, expanded by ``braceexpand``), files grouped
  into samples by ``webdataset``'s own rule, the image one per sample, the label from a ``cls`` file.
- :class:`DatasetSource`: a map-style ``torch.utils.data.Dataset`` yielding images, ``(image, label)`` or dicts
  with an image and a ``label`` (a Hugging Face ``datasets`` dataset, with or without ``.with_format("torch")``).

File access goes through :mod:`fxfeat.extraction.files` (local files; fsspec's filesystems plug in there).

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("cat/1.jpg", "cat/2.png", "dog/1.jpg"):
    ...     (root / name).parent.mkdir(exist_ok=True)
    ...     Image.new("RGB", (8, 8)).save(root / name)
    >>> source = open_source(str(root))
    >>> source.kind, len(source), source.classes, [source.label(i) for i in range(3)]
    ('folder', 3, ('cat', 'dog'), [0, 0, 1])
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from fxfeat.errors import DataSourceError, MissingDependencyError
from fxfeat.extraction.files import filesystem, is_url

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "FolderSource", "ListSource", "TarSource", "DatasetSource",
           "SOURCE_KINDS", "register_source", "open_source", "expand_braces", "split_item"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
_WHAT_TO_PASS = "pass an image folder, a .txt/.csv list of paths, tar shards ('train-{000..009}.tar') or a map-style " \
                "torch Dataset"


class ImageSource:
    """An ordered list of images: the interface every source kind implements.

    A kind sets ``kind``, implements the class method :meth:`accepts` and, in its constructor, lists its items and
    passes them to this one; then :meth:`read` (its items are files) or :meth:`load` (they are objects).

    Attributes:
        kind: ``"folder"``, ``"list"``, ``"tar"``, ``"dataset"`` or a registered kind's name.
        encoded: ``load`` gives a file's bytes (decoded in the workers), not the object a dataset holds.
        location: what the user passed (a path, a pattern, the dataset's class).
        keys: per item, its path (or ``shard/key`` in a tar), ``None`` for a dataset's items.
        labels: per item, its label (``None``: unlabelled).
        classes: class names, where labels come from names (folders, string labels).
    """

    kind: ClassVar[str] = "source"
    encoded: ClassVar[bool] = True

    def __init__(self, location: str, keys: Sequence[str | None], labels: Sequence[int | None],
                 classes: tuple[str, ...] = (), names: Sequence[str] | None = None):
        self.location = location
        self.keys = list(keys)
        self.labels = list(labels)
        self.classes = classes
        self._names = list(names) if names is not None else self.keys  # what identifies an item wherever it lies

    @classmethod
    def accepts(cls, data: Any) -> bool:
        """Whether this kind reads ``data`` (asked by :func:`open_source`, in the order of ``SOURCE_KINDS``)."""
        return False

    def __len__(self) -> int:
        return len(self.keys)

    def label(self, index: int) -> int | None:
        return self.labels[index]

    def read(self, index: int) -> bytes:
        """The file bytes of one item (kinds whose items are files). Runs in the DataLoader workers."""
        raise NotImplementedError(f"{type(self).__name__} implements neither read() nor load()")

    def load(self, index: int) -> tuple[Any, int | None]:
        """``(image, label)`` of one item: the image as encoded bytes (a uint8 tensor) or, for a dataset, the
        object it holds. Runs in the DataLoader workers."""
        data = self.read(index)
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return encoded, self.labels[index]

    def describe(self) -> dict[str, Any]:
        """What identifies this listing in the manifest: kind, count, classes and a digest of the items' names
        (relative to the folder, or as listed) and labels. A rerun on a changed listing is refused; the same
        listing reached by another path (relative or absolute, a moved folder) is the same."""
        digest = hashlib.sha256()
        for name, label in zip(self._names, self.labels):
            digest.update(f"{name}\t{label}\n".encode())
        return {"kind": self.kind, "count": len(self), "classes": list(self.classes),
                "listing_sha256": digest.hexdigest()}


class _FileSource(ImageSource):
    """A source whose items are whole files, named by their paths in ``self.files``."""

    def read(self, index: int) -> bytes:
        return self.files.cat_file(self.keys[index])


class FolderSource(_FileSource):
    """Image files under ``root``, recursively (links to folders followed), in sorted order of their relative
    paths; a first-level subfolder is the class of the files under it."""

    kind = "folder"

    @classmethod
    def accepts(cls, data: Any) -> bool:
        return isinstance(data, str) and not is_url(data) and filesystem(data).isdir(data)

    def __init__(self, root: str):
        self.files = filesystem(root)
        relative = sorted(name for name in (os.path.relpath(path, root).replace(os.sep, "/")
                                            for path in self.files.find(root))
                          if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
        top = [name.split("/", 1)[0] if "/" in name else None for name in relative]
        classes = tuple(sorted({folder for folder in top if folder is not None}))
        index = {name: i for i, name in enumerate(classes)}
        super().__init__(root, [os.path.join(root, name) for name in relative],
                         [None if folder is None else index[folder] for folder in top], classes, names=relative)


class ListSource(_FileSource):
    """Paths listed in a text file (one per line, ``#`` comments) or a CSV/TSV file with a header naming a
    ``path`` column (or ``filepath``, ``file``, ``image``, ``filename``, ``file_name``) and optionally ``label``."""

    kind = "list"
    SUFFIXES = (".txt", ".csv", ".tsv", ".lst")

    @classmethod
    def accepts(cls, data: Any) -> bool:
        return isinstance(data, str) and data.lower().endswith(cls.SUFFIXES) and not is_url(data) \
            and filesystem(data).isfile(data)

    def __init__(self, list_file: str):
        base = os.path.dirname(os.path.abspath(list_file))
        self.files = filesystem(list_file)
        with self.files.open(list_file, "r", encoding="utf-8-sig", newline="") as handle:
            if list_file.lower().endswith((".csv", ".tsv")):
                paths, raw_labels = _table_rows(list_file, handle)
            else:
                paths = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
                raw_labels = [None] * len(paths)
        labels, classes = _labels(raw_labels)
        super().__init__(list_file, [os.path.join(base, path) for path in paths], labels, classes, names=paths)


_PATH_COLUMNS = ("path", "filepath", "file", "image", "filename", "file_name")  # file_name: Hugging Face's metadata.csv
_LABEL_COLUMNS = ("label", "class", "target")


def _table_rows(list_file: str, handle: Any) -> tuple[list[str], list[str | None]]:
    reader = csv.DictReader(handle, delimiter="\t" if list_file.lower().endswith(".tsv") else ",")
    columns = {(name or "").strip().lower(): name for name in reader.fieldnames or ()}
    path_column = next((columns[name] for name in _PATH_COLUMNS if name in columns), None)
    if path_column is None:
        found = ", ".join(repr(name) for name in reader.fieldnames or ()) or "none (the file is empty)"
        raise DataSourceError(f"the list {list_file} has no column of image paths: its header names {found}.",
                              hint="name the column of paths 'path' (and the labels 'label') in the first line, "
                              "or write a .txt list with one path per line.")
    label_column = next((columns[name] for name in _LABEL_COLUMNS if name in columns), None)
    rows = [row for row in reader if row[path_column]]
    return [row[path_column] for row in rows], [row[label_column] if label_column else None for row in rows]


def _labels(raw: list[str | None]) -> tuple[list[int | None], tuple[str, ...]]:
    """Integer labels as they are; string labels as indices into their sorted names (the classes)."""
    values = [value for value in raw if value not in (None, "")]
    if all(re.fullmatch(r"-?\d+", value) for value in values):
        return [int(value) if value not in (None, "") else None for value in raw], ()
    classes = tuple(sorted(set(values)))
    index = {name: i for i, name in enumerate(classes)}
    return [index[value] if value not in (None, "") else None for value in raw], classes


class TarSource(ImageSource):
    """WebDataset-style tar shards: files grouped into samples by ``webdataset``'s ``group_by_keys`` (consecutive
    files sharing the name before the first dot of their base name), per sample its first image and a ``cls`` label.
    The members' offsets, listed once from the tar headers, give random access by index (webdataset's readers
    stream a shard from its start; its indexed ``wids`` needs a shard-list description and maps whole shards)."""

    kind = "tar"

    @classmethod
    def accepts(cls, data: Any) -> bool:
        return isinstance(data, str) and (data.endswith(".tar") or ("{" in data and ".tar" in data))

    def __init__(self, pattern: str):
        self.files = filesystem(pattern)
        shards = expand_braces(pattern)
        missing = [shard for shard in shards if not self.files.isfile(shard)]
        if missing:
            raise DataSourceError(f"{len(missing)} of the {len(shards)} tar shards of {pattern!r} do not exist "
                                  f"(first: {missing[0]}).", hint="check the pattern, e.g. 'train-{000..099}.tar'.")
        keys, labels, self.members = [], [], []
        for shard in shards:
            for key, (offset, size), label in _tar_samples(self.files, shard):
                keys.append(f"{os.path.basename(shard)}/{key}")
                labels.append(label)
                self.members.append((shard, offset, size))
        super().__init__(pattern, keys, labels)
        self._handles: dict[str, Any] = {}

    def read(self, index: int) -> bytes:
        shard, offset, size = self.members[index]
        handle = self._handles.get(shard)
        if handle is None:  # one open file per shard and worker
            handle = self._handles[shard] = self.files.open(shard, "rb")
        handle.seek(offset)
        return handle.read(size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to the workers


_LABEL_SUFFIXES = ("cls", "cls.txt", "label", "cls2")


def _tar_samples(files: Any, shard: str):
    """``(key, (offset, size) of the image, label)`` per sample of one shard, in member order."""
    group_by_keys = _library("webdataset.tariterators", "webdataset", "to read tar shards").group_by_keys

    def entries(archive: tarfile.TarFile):  # webdataset's file records, the image's bytes replaced by its place
        for member in archive:
            if member.isfile():
                suffix = member.name.rpartition("/")[2].partition(".")[2].lower()
                data = archive.extractfile(member).read() if suffix in _LABEL_SUFFIXES else \
                    (member.offset_data, member.size)
                yield {"fname": member.name, "data": data, "__url__": shard}

    try:
        with files.open(shard, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
            for sample in group_by_keys(entries(archive)):
                image = next((suffix for suffix in sample if "." + suffix in IMAGE_EXTENSIONS), None)
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
    braceexpand = _library("braceexpand", "braceexpand", "to expand shard patterns")
    try:
        return list(braceexpand.braceexpand(pattern))
    except braceexpand.UnbalancedBracesError:
        raise DataSourceError(f"the shard pattern {pattern!r} has unbalanced braces.",
                              hint="each '{' has its '}': 'train-{000..099}.tar' (a range) or "
                              "'{train,val}-000.tar' (a list).") from None


class DatasetSource(ImageSource):
    """A map-style dataset; each item an image, ``(image, label, ...)`` or a dict with an image and a label."""

    kind = "dataset"
    encoded = False

    @classmethod
    def accepts(cls, data: Any) -> bool:
        return hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes))

    def __init__(self, dataset: Any):
        count = len(dataset)
        super().__init__(f"{type(dataset).__module__}.{type(dataset).__qualname__}", [None] * count,
                         [None] * count)
        self.dataset = dataset

    def load(self, index: int) -> tuple[Any, int | None]:
        return split_item(self.dataset[index])  # the label is known once the item is read

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "class": self.location, "count": len(self), "classes": [],
                "listing_sha256": None}  # the items are not read to list them


_IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
_LABEL_KEYS = ("label", "labels", "cls", "target", "class")


def split_item(item: Any) -> tuple[Any, int | None]:
    """``(image, label)`` of a dataset item: an image, a tuple/list whose first entry is the image and second the
    label, or a dict with an image key (``image``, ``img``, ``jpg``...) and a label key (``label``, ``cls``...).

    Example:
        >>> split_item(("picture", 3)), split_item({"image": "picture", "label": torch.tensor(1)})
        (('picture', 3), ('picture', 1))
    """
    if isinstance(item, dict):
        image_key = next((key for key in _IMAGE_KEYS if key in item), None)
        if image_key is None:
            raise DataSourceError(f"a dataset item is a dict with keys {sorted(item)} and none of them is an "
                                  f"image ({', '.join(_IMAGE_KEYS)}).", hint="rename the image column 'image'.")
        label = next((item[key] for key in _LABEL_KEYS if key in item), None)
        return item[image_key], _as_label(label)
    if isinstance(item, (tuple, list)) and item:
        return item[0], _as_label(item[1]) if len(item) > 1 else None
    return item, None


def _as_label(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _library(module: str, package: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(f"fxfeat.extract uses {package} {purpose}, and it is not installed.",
                                     hint=f"pip install 'fxfeat[extract]' (or pip install {package}).") from None


SOURCE_KINDS: list[type[ImageSource]] = [TarSource, FolderSource, ListSource, DatasetSource]
"""The source kinds :func:`open_source` asks, in order: the first whose ``accepts(data)`` is true reads ``data``."""


def register_source(kind: type[ImageSource]) -> type[ImageSource]:
    """Add a source kind, asked before the built-in ones (usable as a class decorator).

    Example:
        >>> class Colours(ImageSource):  # solid images named by colour: open, list, load
        ...     kind, encoded = "colours", False
        ...     accepts = classmethod(lambda cls, data: str(data).startswith("colours:"))
        ...     def __init__(self, data):
        ...         names = data.removeprefix("colours:").split(",")
        ...         super().__init__(data, names, [None] * len(names))
        ...     def load(self, index):
        ...         return torch.full((3, 8, 8), 255 * (self.keys[index] == "white"), dtype=torch.uint8), None
        >>> register_source(Colours).kind
        'colours'
        >>> source = open_source("colours:white,black")
        >>> source.keys, source.load(0)[0].max().item(), SOURCE_KINDS.remove(Colours)
        (['white', 'black'], 255, None)
    """
    if kind not in SOURCE_KINDS:
        SOURCE_KINDS.insert(0, kind)
    return kind


def open_source(data: Any) -> ImageSource:
    """The source ``data`` names: a folder, a ``.txt``/``.csv``/``.tsv`` list, a ``.tar`` pattern, a dataset, or
    what a registered kind accepts.

    Raises:
        DataSourceError: the path does not exist, the source is empty or of a kind fxfeat does not read.
    """
    data = os.fspath(data) if isinstance(data, os.PathLike) else data
    if isinstance(data, ImageSource):
        source = data
    else:
        kind = next((kind for kind in SOURCE_KINDS if kind.accepts(data)), None)
        if kind is None:
            raise _unreadable(data)
        source = kind(data)
    if len(source) == 0:
        raise DataSourceError(f"The data source {source.location!r} ({source.kind}) holds no images.",
                              hint=f"image files end in {', '.join(IMAGE_EXTENSIONS)}; check the path.")
    return source


def _unreadable(data: Any) -> DataSourceError:
    if not isinstance(data, str):
        return DataSourceError(f"fxfeat.extract cannot read images from a {type(data).__name__}.",
                               hint=_WHAT_TO_PASS + " (an iterable dataset has no order to resume in).")
    files = filesystem(data)  # a remote URL is refused here, with its own reason
    if not files.exists(data):
        return DataSourceError(f"The data path {data!r} does not exist.", hint=_WHAT_TO_PASS + ".")
    return DataSourceError(f"{data!r} is a file fxfeat does not read as a data source.", hint=_WHAT_TO_PASS + ".")
