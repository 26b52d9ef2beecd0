"""The extraction loop: DataLoader workers decode and preprocess, the main thread runs the extractor, a writer
thread writes the parts.

Workers read, decode and resize/crop each image and stack a batch of uint8 images (one tensor per batch crosses
the process boundary, a quarter of the bytes of float32). The main thread copies it to the device (pinned memory,
non-blocking on a GPU), normalises it there, runs the extractor once and queues each feature's rows (cast to the
stored dtype on the device, copied back without blocking). The writer thread turns them into part files while the
next batch computes; the queue is short, so memory stays bounded whatever the dataset's size. Batches never
straddle two parts, and a part is committed after its last batch.

Example:
    >>> plan = batch_plan([(0, 0, 5), (1, 5, 7)], batch_size=2)
    >>> [(batch.part, batch.ids, batch.last) for batch in plan]
    [(0, [0, 1], False), (0, [2, 3], False), (0, [4], True), (1, [5, 6], True)]
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fxfeat.errors import DataSourceError, ExtractError, InvalidRequestError
from fxfeat.extraction.decode import decode, image_tensor, pil_image
from fxfeat.extraction.features import FeatureSpec
from fxfeat.extraction.filesystem import output_filesystem, remove
from fxfeat.extraction.format import temporary_folder
from fxfeat.extraction.parts import PartWriter
from fxfeat.extraction.preprocess import Preprocessing
from fxfeat.extraction.sources import ImageSource

__all__ = ["PlannedBatch", "batch_plan", "run_parts"]


@dataclass(frozen=True)
class PlannedBatch:
    part: int
    first: int  # the part's row range
    stop: int
    ids: list[int]
    last: bool  # the part's last batch


def batch_plan(parts: list[tuple[int, int, int]], batch_size: int) -> list[PlannedBatch]:
    """The batches of ``parts`` (``(part, first, stop)`` each), in order, none straddling two parts."""
    plan = []
    for part, first, stop in parts:
        for start in range(first, stop, batch_size):
            end = min(start + batch_size, stop)
            plan.append(PlannedBatch(part, first, stop, list(range(start, end)), end == stop))
    return plan


@dataclass
class _Item:
    index: int
    key: str | None
    label: int | None
    image: torch.Tensor | None  # uint8 (C, H, W) after resize/crop, or what a custom transform returned
    size: tuple[int, int] | None  # the original (width, height)
    error: str | None


class _Images(torch.utils.data.Dataset):
    """Items of a source, read, decoded and preprocessed (in the DataLoader workers). A failure is returned as
    the item's ``error``, not raised: the loop records it or raises :class:`ExtractError` itself."""

    def __init__(self, source: ImageSource, preprocessing: Preprocessing | None, transform: Callable | None,
                 channels: int):
        self.source, self.preprocessing, self.transform, self.channels = source, preprocessing, transform, channels
        self.encoded = getattr(source, "encoded", source.kind != "dataset")  # file bytes, or a dataset's objects

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> _Item:
        key, label = self.source.keys[index], None
        try:
            raw, label = self.source.load(index)
            if self.transform is not None:
                image = pil_image(raw) if self.encoded else raw
                size = _size_of(image)
                return _Item(index, key, label, self.transform(image), size, None)
            image = decode(raw, self.channels) if self.encoded else image_tensor(raw, self.channels)
            size = (image.shape[-1], image.shape[-2])
            return _Item(index, key, label, self.preprocessing(image), size, None)
        except DataSourceError:  # not one bad image but a source fxfeat cannot use: stop with the reason
            raise
        except Exception as error:  # a missing, truncated or corrupt file: recorded, not fatal
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            return _Item(index, key, label, None, None, reason)


def _size_of(image: Any) -> tuple[int, int] | None:
    if hasattr(image, "size") and isinstance(image.size, tuple):  # PIL
        return image.size
    shape = getattr(image, "shape", None)
    return (shape[-1], shape[-2]) if shape is not None and len(shape) >= 2 else None


class _Batch:
    """The items of one batch; the images that could be read stacked into one tensor."""

    def __init__(self, items: list[_Item]):
        read = [item for item in items if item.error is None]
        self.ids = [item.index for item in read]
        self.keys = [item.key for item in read]
        self.labels = [item.label for item in read]
        self.sizes = [item.size or (None, None) for item in read]
        self.failures = [(item.index, item.key, item.error) for item in items if item.error is not None]
        shapes = {tuple(item.image.shape) for item in read}
        if len(shapes) > 1:
            raise InvalidRequestError(f"the images of one batch have different shapes after preprocessing "
                                      f"({', '.join(map(str, sorted(shapes)))}).",
                                      hint="a transform= must give every image the same size (resize and crop).")
        self.images = torch.stack([item.image for item in read]) if read else None

    def pin_memory(self) -> _Batch:
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class _Writer:
    """A thread writing parts from a short queue; its error is raised in the main thread at the next call."""

    def __init__(self, out: str, specs: list[FeatureSpec], dtype: np.dtype, tag: str, run: dict[str, Any],
                 on_commit: Callable[[dict[str, Any]], None], files: Any):
        self.out, self.tag, self.run, self.on_commit, self.files = out, tag, run, on_commit, files
        self.features = {spec.name: (spec.shape(), dtype) for spec in specs}
        self._queue: queue.Queue = queue.Queue(maxsize=3)
        self._open: PartWriter | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="fxfeat-writer", daemon=True)
        self._thread.start()

    def put(self, message: tuple) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(message, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop after what is queued is dropped; an open part's temporary files are removed."""
        self._stop = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        self._thread.join(timeout=60)
        if self._open is not None:
            self._open.abort()
            self._open = None

    _stop = False

    def _work(self) -> None:
        try:
            while True:
                message = self._queue.get()
                if message is None or self._stop:
                    return
                self._handle(*message)
        except BaseException as error:  # raised in the main thread by put/finish
            self._error = error

    def _handle(self, kind: str, batch: PlannedBatch, rows: _Batch | None = None,
                arrays: dict[str, torch.Tensor] | None = None, ready: Any = None) -> None:
        if self._open is None:
            self._open = PartWriter(self.out, batch.part, (batch.first, batch.stop), self.features, self.tag,
                                    self.files)
        if kind == "rows":
            if ready is not None:
                ready.synchronize()  # the device-to-host copies of this batch
            if rows.ids:
                self._open.add(rows.ids, rows.keys, rows.labels, rows.sizes,
                               {name: array.numpy() for name, array in arrays.items()})
            for index, key, reason in rows.failures:
                self._open.skip(index, key, reason)
        else:  # commit
            record = self._open.commit(self.run)
            self._open = None
            self.on_commit(record)


def run_parts(module: nn.Module, specs: list[FeatureSpec], source: ImageSource, parts: list[tuple[int, int, int]],
              *, out: str, preprocessing: Preprocessing | None, transform: Callable | None, channels: int,
              batch_size: int, num_workers: int, device: torch.device, dtype: torch.dtype, on_error: str,
              tag: str, run: dict[str, Any], progress: Callable[[int], None],
              on_commit: Callable[[dict[str, Any]], None], files: Any = None) -> None:
    """Extract ``parts`` of ``source`` with ``module`` into ``out``; ``progress(n)`` after each batch,
    ``on_commit(record)`` after each part. ``tag`` names this run's (and process's) temporary folder, removed at
    the end."""
    plan = batch_plan(parts, batch_size)
    if not plan:
        return
    files = files if files is not None else output_filesystem(out)
    cuda = device.type == "cuda"
    loader = torch.utils.data.DataLoader(
        _Images(source, preprocessing, transform, channels), batch_sampler=[batch.ids for batch in plan],
        num_workers=num_workers, collate_fn=_Batch, pin_memory=cuda,
        prefetch_factor=4 if num_workers else None,
    )
    writer = _Writer(out, specs, np.dtype(str(dtype).removeprefix("torch.")), tag, run, on_commit, files)
    try:
        with torch.inference_mode():
            for planned, batch in zip(plan, loader):
                if on_error == "raise" and batch.failures:
                    index, key, reason = batch.failures[0]
                    raise ExtractError(f"cannot read image {key or index} ({reason}).",
                                       hint="fix or remove the file, or pass on_error='skip' to record and skip it.")
                arrays, ready = {}, None
                if batch.images is not None:
                    images = batch.images.to(device, non_blocking=cuda)
                    x = preprocessing.normalize(images) if transform is None else images.float()
                    outputs = module(x)
                    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
                    arrays = {spec.name: spec.apply(outputs).to(dtype).to("cpu", non_blocking=cuda)
                              for spec in specs}
                    if cuda:
                        ready = torch.cuda.Event()
                        ready.record()
                writer.put(("rows", planned, batch, arrays, ready))
                if planned.last:
                    writer.put(("commit", planned))
                progress(len(planned.ids))
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        remove(files, f"{out}/{temporary_folder(tag)}", recursive=True)
