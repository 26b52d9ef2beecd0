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
  (and optionally ``label``); relative paths are relative to the list file, and an entry may be a URL itself.
- :class:`TarSource`: WebDataset-style shards (``train-{000..099}.tar``, expanded by ``braceexpand``), files grouped
  into samples by ``webdataset``'s own rule, the image one per sample, the label from a ``cls`` file; a shard is a
  path, a URL, or a ``pipe:CMD`` command whose output is the shard (read forward, without random access).
- :class:`DatasetSource`: a map-style ``torch.utils.data.Dataset`` yielding images, ``(image, label)`` or dicts
  with an image and a ``label`` (a Hugging Face ``datasets`` dataset, with or without ``.with_format("torch")``).

Every path may be an fsspec URL (``https://``, ``s3://``...; ``storage_options`` per protocol): file access goes
through :mod:`fxfeat.extraction.files` (fsspec's filesystems, ``pipe:`` commands).

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
import os
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from fxfeat.errors import DataSourceError
from fxfeat.extraction.files import (
    PipeReader,
    filesystem,
    find,
    is_file,
    is_pipe,
    join,
    parent,
    read_errors,
    unreachable,
)
from fxfeat.extraction.shards import expand_braces, tar_samples

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
    """A source whose items are whole files, named by their paths or URLs."""

    storage_options: dict[str, Any] | None = None

    def read(self, index: int) -> bytes:
        key = self.keys[index]
        # The filesystem is asked for in the process that reads (fsspec keeps one per process and URL's options):
        # an instance made before the DataLoader forked its workers is not theirs to use (fsspec's async ones).
        return filesystem(key, self.storage_options).cat_file(key)


class FolderSource(_FileSource):
    """Image files under ``root``, recursively (links to folders followed), in sorted order of their relative
    paths; a first-level subfolder is the class of the files under it."""

    kind = "folder"

    @classmethod
    def accepts(cls, data: Any, storage_options: dict[str, Any] | None = None) -> bool:
        return isinstance(data, str) and not is_pipe(data) and filesystem(data, storage_options).isdir(data)

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.files, self.storage_options = filesystem(root, storage_options), storage_options
        base = root.rstrip("/") or "/"
        relative = sorted(name for name in (path[len(base):].lstrip("/").replace(os.sep, "/")
                                            for path in find(self.files, root))
                          if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
        top = [name.split("/", 1)[0] if "/" in name else None for name in relative]
        classes = tuple(sorted({folder for folder in top if folder is not None}))
        index = {name: i for i, name in enumerate(classes)}
        super().__init__(root, [join(root, name) for name in relative],
                         [None if folder is None else index[folder] for folder in top], classes, names=relative)


class ListSource(_FileSource):
    """Paths listed in a text file (one per line, ``#`` comments) or a CSV/TSV file with a header naming a
    ``path`` column (or ``filepath``, ``file``, ``image``, ``filename``, ``file_name``) and optionally ``label``."""

    kind = "list"
    SUFFIXES = (".txt", ".csv", ".tsv", ".lst")

    @classmethod
    def accepts(cls, data: Any, storage_options: dict[str, Any] | None = None) -> bool:
        return isinstance(data, str) and data.lower().endswith(cls.SUFFIXES) and not is_pipe(data) \
            and is_file(filesystem(data, storage_options), data)

    def __init__(self, list_file: str, storage_options: dict[str, Any] | None = None):
        base = parent(list_file)
        self.files, self.storage_options = filesystem(list_file, storage_options), storage_options
        with self.files.open(list_file, "r", encoding="utf-8-sig", newline="") as handle:
            if list_file.lower().endswith((".csv", ".tsv")):
                paths, raw_labels = _table_rows(list_file, handle)
            else:
                paths = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
                raw_labels = [None] * len(paths)
        labels, classes = _labels(raw_labels)
        super().__init__(list_file, [join(base, path) for path in paths], labels, classes, names=paths)


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
    stream a shard from its start; its indexed ``wids`` needs a shard-list description and maps whole shards).

    A shard on a filesystem (a path, ``https://``, ``s3://``...) is listed in one sequential read of large blocks
    and its images read by byte range, one request each. A ``pipe:CMD`` shard has no random access: it is listed
    from the command's output, and read forward from a new run of the command in each process that reads it, the
    samples before the ones asked for skipped."""

    kind = "tar"

    @classmethod
    def accepts(cls, data: Any, storage_options: dict[str, Any] | None = None) -> bool:
        return isinstance(data, str) and (data.endswith(".tar") or ("{" in data and ".tar" in data) or is_pipe(data))

    def __init__(self, pattern: str, storage_options: dict[str, Any] | None = None):
        shards = expand_braces(pattern)
        self.files = None if is_pipe(shards[0]) else filesystem(shards[0], storage_options)
        self.storage_options = storage_options
        missing = [shard for shard in shards if not is_pipe(shard) and not is_file(self.files, shard)]
        if missing:
            raise DataSourceError(f"{len(missing)} of the {len(shards)} tar shards of {pattern!r} do not exist "
                                  f"(first: {missing[0]}).", hint="check the pattern, e.g. 'train-{000..099}.tar'.")
        keys, labels, self.members = [], [], []
        for shard in shards:
            for key, (offset, size), label in tar_samples(self.files, shard, IMAGE_EXTENSIONS):
                keys.append(f"{os.path.basename(shard)}/{key}")
                labels.append(label)
                self.members.append((shard, offset, size))
        super().__init__(pattern, keys, labels)
        self._pipe: PipeReader | None = None

    def read(self, index: int) -> bytes:
        shard, offset, size = self.members[index]
        if not is_pipe(shard):
            return filesystem(shard, self.storage_options).cat_file(shard, start=offset, end=offset + size)
        if self._pipe is None or self._pipe.url != shard:  # one command running per process
            if self._pipe is not None:
                self._pipe.close()
            self._pipe = PipeReader(shard)
        return self._pipe.read(offset, size)


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


SOURCE_KINDS: list[type[ImageSource]] = [TarSource, ListSource, FolderSource, DatasetSource]
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


def open_source(data: Any, storage_options: dict[str, Any] | None = None) -> ImageSource:
    """The source ``data`` names: a folder, a ``.txt``/``.csv``/``.tsv`` list, a ``.tar`` pattern (paths or fsspec
    URLs, the options of each protocol in ``storage_options``: ``{"s3": {"endpoint_url": ...}}``), a dataset, or
    what a registered kind accepts.

    Raises:
        DataSourceError: the path does not exist or cannot be read (a host that does not answer), the source is
            empty or of a kind fxfeat does not read.
        MissingDependencyError: the package of a URL's protocol is not installed.
    """
    data = os.fspath(data) if isinstance(data, os.PathLike) else data
    options = {"storage_options": storage_options} if storage_options else {}  # only the file kinds take them
    if isinstance(data, ImageSource):
        source = data
    else:
        try:
            kind = next((kind for kind in SOURCE_KINDS if kind.accepts(data, **options)), None)
            if kind is None:
                raise _unreadable(data, storage_options)
            source = kind(data, **options)
        except read_errors() as error:
            raise unreachable(str(data), error) from None
    if len(source) == 0:
        raise DataSourceError(f"The data source {source.location!r} ({source.kind}) holds no images.",
                              hint=f"image files end in {', '.join(IMAGE_EXTENSIONS)}; check the path.")
    return source


def _unreadable(data: Any, storage_options: dict[str, Any] | None) -> DataSourceError:
    if not isinstance(data, str):
        return DataSourceError(f"fxfeat.extract cannot read images from a {type(data).__name__}.",
                               hint=_WHAT_TO_PASS + " (an iterable dataset has no order to resume in).")
    files = filesystem(data, storage_options)
    if not files.exists(data):
        return DataSourceError(f"The data path {data!r} does not exist.", hint=_WHAT_TO_PASS + ".")
    return DataSourceError(f"{data!r} is a file fxfeat does not read as a data source.", hint=_WHAT_TO_PASS + ".")
