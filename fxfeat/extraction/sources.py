"""Where ``fxfeat.extract`` reads images: a folder, a list file, WebDataset-style tar shards, or a map-style dataset.

Every source is a fixed, ordered list of items (the dataset order that parts are cut from), listed once in the
main process and read item by item in the DataLoader workers:

- :class:`FolderSource`: every image file under a folder, recursively, sorted by path; files in a first-level
  subfolder are labelled by that subfolder, as torchvision's ``ImageFolder`` labels its class folders.
- :class:`ListSource`: a ``.txt`` file with one path per line, or a ``.csv``/``.tsv`` file with a ``path`` column
  (and optionally ``label``); relative paths are relative to the list file.
- :class:`TarSource`: WebDataset-style shards (``train-{000..099}.tar``): files grouped by key (the name before the
  first dot), the image one per key, the label from a ``cls`` file.
- :class:`DatasetSource`: a map-style ``torch.utils.data.Dataset`` yielding images, ``(image, label)`` or dicts
  with an image and a ``label`` (a Hugging Face ``datasets`` dataset, with or without ``.with_format("torch")``).

Example:
    >>> import tempfile, pathlib
    >>> from PIL import Image
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("cat/1.jpg", "cat/2.png", "dog/1.jpg"):
    ...     (root / name).parent.mkdir(exist_ok=True)
    ...     Image.new("RGB", (8, 8)).save(root / name)
    >>> source = open_source(str(root))
    >>> len(source), source.classes, [source.label(i) for i in range(3)]
    (3, ('cat', 'dog'), [0, 0, 1])
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fxfeat.errors import DataSourceError

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "FolderSource", "ListSource", "TarSource", "DatasetSource",
           "open_source", "expand_braces", "split_item"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class ImageSource:
    """An ordered list of images. Subclasses set ``kind`` and ``location`` and implement :meth:`read`.

    Attributes:
        kind: ``"folder"``, ``"list"``, ``"tar"`` or ``"dataset"``.
        location: what the user passed (a path, a pattern, the dataset's class).
        keys: per item, its path (or ``shard/key`` in a tar), ``None`` for a dataset's items.
        labels: per item, its label (``None``: unlabelled).
        classes: class names, where labels come from names (folders, string labels).
    """

    kind = "source"

    def __init__(self, location: str, keys: Sequence[str | None], labels: Sequence[int | None],
                 classes: tuple[str, ...] = (), names: Sequence[str] | None = None):
        self.location = location
        self.keys = list(keys)
        self.labels = list(labels)
        self.classes = classes
        self._names = list(names) if names is not None else self.keys  # what identifies an item wherever it lies

    def __len__(self) -> int:
        return len(self.keys)

    def label(self, index: int) -> int | None:
        return self.labels[index]

    def load(self, index: int) -> tuple[Any, int | None]:
        """``(image, label)`` of one item: the image as encoded bytes (a uint8 tensor) or, for a dataset, the
        object it holds. Runs in the DataLoader workers."""
        return self._encoded(index), self.labels[index]

    def _encoded(self, index: int) -> torch.Tensor:
        return _read_file(self.keys[index])

    def describe(self) -> dict[str, Any]:
        """What identifies this listing in the manifest: kind, count, classes and a digest of the items' names
        (relative to the folder, or as listed) and labels. A rerun on a changed listing is refused; the same
        listing reached by another path (relative or absolute, a moved folder) is the same."""
        digest = hashlib.sha256()
        for name, label in zip(self._names, self.labels):
            digest.update(f"{name}\t{label}\n".encode())
        return {"kind": self.kind, "count": len(self), "classes": list(self.classes),
                "listing_sha256": digest.hexdigest()}


class FolderSource(ImageSource):
    """Image files under ``root``, recursively, in sorted order of their relative paths."""

    kind = "folder"

    def __init__(self, root: str):
        base = Path(root)
        relative = sorted(
            path.relative_to(base).as_posix()
            for path in base.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
        )
        top = [name.split("/", 1)[0] if "/" in name else None for name in relative]
        classes = tuple(sorted({folder for folder in top if folder is not None}))
        index = {name: i for i, name in enumerate(classes)}
        super().__init__(root, [os.path.join(root, name) for name in relative],
                         [None if folder is None else index[folder] for folder in top], classes, names=relative)


class ListSource(ImageSource):
    """Paths listed in a text file (one per line, ``#`` comments) or a CSV/TSV file with a header."""

    kind = "list"

    def __init__(self, list_file: str):
        base = os.path.dirname(os.path.abspath(list_file))
        if list_file.lower().endswith((".csv", ".tsv")):
            paths, raw_labels = _table_rows(list_file)
        else:
            with open(list_file, encoding="utf-8") as lines:
                paths = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            raw_labels = [None] * len(paths)
        labels, classes = _labels(raw_labels)
        super().__init__(list_file, [os.path.join(base, path) for path in paths], labels, classes, names=paths)


def _table_rows(list_file: str) -> tuple[list[str], list[str | None]]:
    with open(list_file, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t" if list_file.lower().endswith(".tsv") else ","))
    if not rows:
        return [], []
    columns = list(rows[0])
    path_column = next((name for name in ("path", "filepath", "file", "image", "filename") if name in columns),
                       columns[0])
    label_column = next((name for name in ("label", "class", "target") if name in columns), None)
    return ([row[path_column] for row in rows if row[path_column]],
            [row[label_column] if label_column else None for row in rows if row[path_column]])


def _labels(raw: list[str | None]) -> tuple[list[int | None], tuple[str, ...]]:
    """Integer labels as they are; string labels as indices into their sorted names (the classes)."""
    values = [value for value in raw if value not in (None, "")]
    if all(re.fullmatch(r"-?\d+", value) for value in values):
        return [int(value) if value not in (None, "") else None for value in raw], ()
    classes = tuple(sorted(set(values)))
    index = {name: i for i, name in enumerate(classes)}
    return [index[value] if value not in (None, "") else None for value in raw], classes


class TarSource(ImageSource):
    """WebDataset-style tar shards: per key, one image file and optionally a ``cls`` label file."""

    kind = "tar"

    def __init__(self, pattern: str):
        shards = expand_braces(pattern)
        missing = [shard for shard in shards if not os.path.isfile(shard)]
        if missing:
            raise DataSourceError(f"{len(missing)} of the {len(shards)} tar shards of {pattern!r} do not exist "
                                  f"(first: {missing[0]}).", hint="check the pattern, e.g. 'train-{000..099}.tar'.")
        keys, labels, self.members = [], [], []
        for shard in shards:
            for key, (offset, size), label in _tar_samples(shard):
                keys.append(f"{os.path.basename(shard)}/{key}")
                labels.append(label)
                self.members.append((shard, offset, size))
        super().__init__(pattern, keys, labels)
        self._handles: dict[str, Any] = {}

    def _encoded(self, index: int) -> torch.Tensor:
        shard, offset, size = self.members[index]
        handle = self._handles.get(shard)
        if handle is None:  # one open file per shard and worker
            handle = self._handles[shard] = open(shard, "rb")
        handle.seek(offset)
        return torch.frombuffer(bytearray(handle.read(size)), dtype=torch.uint8)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # open files do not travel to the workers


def _tar_samples(shard: str):
    """``(key, (offset, size) of the image, label)`` per sample of one shard, in member order."""
    samples: dict[str, dict[str, Any]] = {}
    with tarfile.open(shard, "r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            stem, dot, extension = name.partition(".")
            if not dot:
                continue
            sample = samples.setdefault(f"{folder}/{stem}" if folder else stem, {})
            extension = extension.lower()
            if "." + extension in IMAGE_EXTENSIONS and "image" not in sample:
                sample["image"] = (member.offset_data, member.size)
            elif extension in ("cls", "cls.txt", "label", "cls2"):
                text = archive.extractfile(member).read().decode().strip()
                sample["label"] = int(text) if re.fullmatch(r"-?\d+", text) else None
    for key, sample in samples.items():
        if "image" in sample:
            yield key, sample["image"], sample.get("label")


def expand_braces(pattern: str) -> list[str]:
    """The paths a WebDataset brace pattern names: ``{000..012}`` (zero-padded ranges) and ``{a,b}``.

    Example:
        >>> expand_braces("train-{00..02}.tar"), expand_braces("{a,b}-{1..2}.tar")
        (['train-00.tar', 'train-01.tar', 'train-02.tar'], ['a-1.tar', 'a-2.tar', 'b-1.tar', 'b-2.tar'])
    """
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = []
    for part in parts:
        match = re.fullmatch(r"\{(\d+)\.\.(\d+)\}", part)
        if match:
            first, last = match.groups()
            width = len(first)
            choices.append([str(n).zfill(width) for n in range(int(first), int(last) + 1)])
        elif part.startswith("{") and part.endswith("}") and "," in part:
            choices.append(part[1:-1].split(","))
        else:
            choices.append([part])
    return ["".join(combination) for combination in itertools.product(*choices)]


class DatasetSource(ImageSource):
    """A map-style dataset; each item an image, ``(image, label, ...)`` or a dict with an image and a label."""

    kind = "dataset"

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


def _read_file(path: str) -> torch.Tensor:
    with open(path, "rb") as handle:
        return torch.frombuffer(bytearray(handle.read()), dtype=torch.uint8)


def open_source(data: Any) -> ImageSource:
    """The source ``data`` names: a folder, a ``.txt``/``.csv``/``.tsv`` list, a ``.tar`` pattern, or a dataset.

    Raises:
        DataSourceError: the path does not exist, the source is empty or of a kind fxfeat does not read.
    """
    if isinstance(data, ImageSource):
        source = data
    elif isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if path.endswith(".tar") or ("{" in path and ".tar" in path):
            source = TarSource(path)
        elif os.path.isdir(path):
            source = FolderSource(path)
        elif os.path.isfile(path) and path.lower().endswith((".txt", ".csv", ".tsv", ".lst")):
            source = ListSource(path)
        elif not os.path.exists(path):
            raise DataSourceError(f"The data path {path!r} does not exist.",
                                  hint="pass an image folder, a .txt/.csv list of paths, tar shards "
                                  "('train-{000..009}.tar') or a torch Dataset.")
        else:
            raise DataSourceError(f"{path!r} is a file fxfeat does not read as a data source.",
                                  hint="pass an image folder, a .txt/.csv list of paths, .tar shards or a Dataset.")
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        source = DatasetSource(data)
    else:
        raise DataSourceError(f"fxfeat.extract cannot read images from a {type(data).__name__}.",
                              hint="pass an image folder, a .txt/.csv list of paths, tar shards or a map-style "
                              "torch Dataset (an iterable dataset has no order to resume in).")
    if len(source) == 0:
        raise DataSourceError(f"The data source {source.location!r} ({source.kind}) holds no images.",
                              hint=f"image files end in {', '.join(IMAGE_EXTENSIONS)}; check the path.")
    return source
