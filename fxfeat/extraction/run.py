"""``fxfeat.extract``: a dataset through one compiled extractor into parts on disk, on one process or many.

The steps: build the model (a name) and one extractor for every requested feature; resolve the model's
preprocessing; list the data; check the output directory against this configuration (rank 0) and find the parts
still to do (each rank verifies its share of the records); split those among the ranks; run the loop; merge the
records into the manifest (rank 0, after every rank is done).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxfeat.errors import (
    ExtractError,
    FxFeatWarning,
    InvalidModelError,
    InvalidRequestError,
    MissingDependencyError,
    ShapePropagationError,
)
from fxfeat.extraction.compute_dtype import (
    check_compute_dtype,
    choose_compute_dtype,
    describe_compute,
    dtype_name,
    inference_module,
    recorded_compute_dtype,
)
from fxfeat.extraction.directory import OutputDirectory
from fxfeat.extraction.distributed import Ranks
from fxfeat.extraction.features import FeatureSpec, build_extractor, extractor_features
from fxfeat.extraction.filesystem import output_filesystem
from fxfeat.extraction.format import STORED_DTYPES, configuration, feature_entry, model_fingerprint
from fxfeat.extraction.lock import output_lock
from fxfeat.extraction.loop import run_parts
from fxfeat.extraction.preprocess import LibraryTransform, Preprocessing, resolve_preprocessing
from fxfeat.extraction.sources import open_source
from fxfeat.models import build_model
from fxfeat.module import FeatureGraphModule
from fxfeat.plan import make_request

__all__ = ["ExtractSummary", "extract"]


@dataclass(frozen=True)
class ExtractSummary:
    """What one ``fxfeat.extract`` call did (every rank's work, on every rank).

    Attributes:
        path: the output directory.
        images: images written by this call.
        skipped: ``(id, path, reason)`` of the images this call could not read.
        parts_written: parts this call wrote; ``parts_kept``: parts an earlier run wrote, verified and kept.
        parts_total: parts of the whole dataset.
        seconds: wall time of the call (building the extractor included); ``images_per_second``: of the loop.
        complete: every part of the dataset is written.
        features: per feature, its per-image shape as written.
    """

    path: str
    images: int
    skipped: list[tuple[int, str | None, str]]
    parts_written: int
    parts_kept: int
    parts_total: int
    seconds: float
    images_per_second: float
    complete: bool
    features: dict[str, tuple[int, ...]] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = (f"{self.images} images written to {self.path} in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s); {self.parts_written} parts written, {self.parts_kept} "
                f"kept from an earlier run, of {self.parts_total}")
        if self.compute:
            text += f"; computed in {describe_compute(self.compute)}"
        if self.skipped:
            text += f"; {len(self.skipped)} skipped (first: {self.skipped[0][1] or self.skipped[0][0]}: " \
                    f"{self.skipped[0][2]})"
        return text


def extract(
    model: nn.Module | str,
    data: Any,
    out: str,
    *,
    features: str | int | Sequence[str | int] = "pooled",
    pool: str | dict[str, str | None] | None = None,
    transform: Callable | Preprocessing | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    dtype: torch.dtype = torch.float16,
    compute_dtype: torch.dtype | None = None,
    shard_size: int = 10_000,
    resume: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    optimize: bool = True,
    on_error: str = "skip",
    out_indices: int | tuple[int, ...] | None = None,
    levels: str | list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    output_stride: int | None = None,
    weights: str = "pretrained",
    progress: bool = True,
    storage_options: dict[str, dict[str, Any]] | None = None,
) -> ExtractSummary:
    """Extract features of every image of ``data`` into ``out``, resumably, each image exactly once; the same
    call under ``torchrun`` splits the work across the processes.

    Args:
        model: an ``nn.Module`` (never modified), an extractor ``fxfeat.compile`` returned (its outputs are the
            features), or a name: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH`` (a dual encoder's image side),
            ``open_clip:ARCH[/TAG]`` (the image tower), ``package.module:factory``.
        data: an image folder (recursive; first-level subfolders are class labels), a ``.txt``/``.csv`` list of
            paths, WebDataset-style ``.tar`` shards (``"train-{000..099}.tar"``) or a map-style dataset; paths may be
            fsspec URLs (``https://host/train-{000..099}.tar``, ``s3://bucket/images/``) and shards ``pipe:CMD``.
        out: the output directory, a path or an fsspec URL (``s3://bucket/features``; see docs/extract.md for the
            layout and what is guaranteed on which filesystem).
        features: ``"pooled"``, ``"unpooled"``, ``"features"`` (the pyramid levels ``out_indices`` selects), a level
            index or name, or a list of these; all computed by one forward pass.
        pool: ``"avg"``/``"max"`` turns feature maps into vectors; a dict gives it per feature name.
        transform: ``None`` uses the model's own preprocessing, asked of its library (torchvision's weights
            transforms, a Hugging Face ``AutoImageProcessor``, open_clip's transform, timm's
            ``resolve_model_data_config``, else ImageNet's), whose size is then the size the extractor is compiled
            for unless ``input_size`` says otherwise; a :class:`~fxfeat.extraction.preprocess.Preprocessing`; or a
            callable taking a PIL image (a dataset's item as it is) and returning a normalised float ``(C, H, W)``
            tensor.
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images (``None``: the CPUs of this process's share, at most 8).
        dtype: the dtype of the written features. numpy has no bfloat16: bfloat16 features are written as float32.
        compute_dtype: the dtype the extractor computes in: ``None`` decides (on a GPU ``dtype`` where it is half
            precision; on the CPU, for half-precision rows, the faster of float32 and bfloat16 in a short timed
            probe, as this CPU computes them; float32 otherwise; a rerun the dtype the output records);
            ``torch.float32`` or ``torch.bfloat16`` forces one. Part of the configuration a rerun must match.
        shard_size: images per part (parts are cut by dataset order, whatever the number of processes).
        resume: keep the verified parts of an earlier run of the same configuration and do the rest.
        overwrite: replace an earlier extraction in ``out`` (``out`` must hold only an fxfeat output).
        device: where the extractor runs (``None``: this rank's GPU if there is one, else the CPU).
        optimize: run the extractor through ``fxfeat.optimize_for_inference``.
        on_error: ``"skip"`` records an unreadable image (in the manifest) and goes on; ``"raise"`` raises
            :class:`~fxfeat.ExtractError` naming it.
        out_indices, levels, input_size, output_stride: as in :func:`fxfeat.compile`.
        weights: for a model given by name: ``"pretrained"``, ``"random"`` or a checkpoint path.
        progress: show a progress bar (tqdm; rank 0 only).
        storage_options: per protocol, the options of its fsspec filesystem for ``data`` and ``out`` URLs
            (``{"s3": {"endpoint_url": URL, "key": ..., "secret": ...}}``), else fsspec's configuration.

    Returns:
        An :class:`ExtractSummary`.

    Example:
        >>> import tempfile, torchvision, fxfeat
        >>> from PIL import Image
        >>> images = tempfile.mkdtemp()
        >>> for i in range(3):
        ...     Image.new("RGB", (40 + i, 30), color=(i * 60, 0, 0)).save(f"{images}/{i}.jpg")
        >>> summary = fxfeat.extract(torchvision.models.resnet18(), images, tempfile.mkdtemp(),
        ...                          features=["pooled", "layer3"], pool={"layer3": "avg"}, progress=False)
        >>> summary.images, summary.features
        (3, {'pooled': (512,), 'layer3': (256,)})
    """
    started = time.perf_counter()
    _check_arguments(batch_size, shard_size, on_error, dtype, num_workers)
    check_compute_dtype(compute_dtype)
    ranks = Ranks.from_environment()
    lock = output_lock(out) if ranks.rank == 0 else None  # rank 0 holds it for all (None: an object store)
    try:
        device = _device(device, ranks)
        module, specs, preprocessing, fingerprint = _prepared_model(
            model, features, pool, transform, out_indices, levels, input_size, output_stride, weights)
        channels = module.input_size[0]
        source = open_source(data, storage_options)
        stored = STORED_DTYPES.get(dtype, dtype)
        part_count = -(-len(source) // shard_size)
        output = OutputDirectory(out, output_filesystem(os.fspath(out), storage_options))
        ranks.share(lambda: lock and lock.acquire())  # a second run fails here, on every rank
        choice = ranks.share(lambda: choose_compute_dtype(  # a rerun computes as the output records
            module, device, dtype, compute_dtype, None if overwrite else recorded_compute_dtype(
                output.read_manifest()), optimize))
        config = _config(fingerprint, preprocessing, transform, specs, stored, source, shard_size,
                         dtype_name(choice.dtype))
        run_name = ranks.share(lambda: output.prepare(config, part_count, overwrite, resume))
        mine_to_verify = [part for part in range(part_count) if part % ranks.world == ranks.rank]
        todo = sorted(part for redo in ranks.all_gather(output.damaged_or_missing(mine_to_verify)) for part in redo)
        mine = todo[ranks.rank::ranks.world]
        runner = choice.modules[choice.dtype] if choice.dtype in choice.modules else \
            inference_module(module, device, choice.dtype, optimize)
        fast = preprocessing if isinstance(preprocessing, Preprocessing) else None
        run_info = {"device": device.type, "compute_dtype": dtype_name(choice.dtype), "compute": choice.as_dict(),
                    "optimized": optimize, "world": ranks.world, "rank": ranks.rank, "data": source.location,
                    "model": model if isinstance(model, str) else None}
        parts = [(part, part * shard_size, min((part + 1) * shard_size, len(source))) for part in mine]
        written: dict[str, Any] = {"images": 0, "skipped": [], "parts": 0}

        def committed(record: dict[str, Any]) -> None:
            written["images"] += record["count"]
            written["skipped"] += [(entry["id"], entry["path"], entry["reason"]) for entry in record["skipped"]]
            written["parts"] += 1

        loop_started = time.perf_counter()
        label = "fxfeat extract" + (f" (rank 0 of {ranks.world})" if ranks.world > 1 else "")
        with _tqdm()(total=sum(stop - first for _, first, stop in parts), unit="img", desc=label, smoothing=0.05,
                  disable=not (progress and ranks.rank == 0)) as bar:
            run_parts(runner, specs, source, parts, out=out, preprocessing=fast,
                      transform=None if fast is not None else preprocessing or transform, channels=channels,
                      batch_size=batch_size, num_workers=_workers(num_workers, ranks), device=device, dtype=stored,
                      on_error=on_error, tag=f"{run_name}-{ranks.rank}", run=run_info, progress=bar.update,
                      on_commit=committed, files=output.files)
        written["loop_seconds"] = time.perf_counter() - loop_started
        everyone = ranks.all_gather(written)
        manifest = ranks.share(lambda: output.finish(config, part_count))
    finally:
        if lock is not None:
            lock.release()
        ranks.close()
    if manifest["images"] == 0:
        raise _nothing_written(out, manifest)
    images = sum(rank["images"] for rank in everyone)
    loop_seconds = max(rank["loop_seconds"] for rank in everyone)
    return ExtractSummary(
        path=out, images=images, skipped=[entry for rank in everyone for entry in rank["skipped"]],
        parts_written=sum(rank["parts"] for rank in everyone), parts_kept=part_count - len(todo),
        parts_total=part_count, seconds=time.perf_counter() - started,
        images_per_second=images / loop_seconds if loop_seconds > 0 else 0.0, complete=manifest["complete"],
        features={spec.name: spec.shape() for spec in specs}, compute=choice.as_dict(),
    )


def _check_arguments(batch_size, shard_size, on_error, dtype, num_workers) -> None:
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidRequestError(f"{name} must be a positive int, not {value!r}.", hint=f"e.g. {name}=64.")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise InvalidRequestError(f"num_workers must be None or an int >= 0, not {num_workers!r}.",
                                  hint="0 decodes in the main process.")
    if on_error not in ("skip", "raise"):
        raise InvalidRequestError(f"on_error must be 'skip' or 'raise', not {on_error!r}.",
                                  hint="'skip' records unreadable images in the manifest and goes on.")
    if dtype not in STORED_DTYPES:
        raise InvalidRequestError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32, not {dtype!r}.",
                                  hint="float16 halves the files; float32 keeps every bit the extractor computes.")


def _device(device: str | torch.device | None, ranks: Ranks) -> torch.device:
    if device is None:
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count()) if torch.cuda.is_available() \
            else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device={str(device)!r}, but torch sees no CUDA device here.",
                                  hint="leave device=None to use a GPU when there is one, else the CPU.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
    return device


def _workers(num_workers: int | None, ranks: Ranks) -> int:
    if num_workers is not None:
        return num_workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // ranks.local_world))


def _prepared_model(model, features, pool, transform, out_indices, levels, input_size, output_stride, weights,
                    ) -> tuple[FeatureGraphModule, list[FeatureSpec], Preprocessing | LibraryTransform | None,
                               dict[str, Any]]:
    """The extractor, its feature specs, the preprocessing (``None`` for a callable transform) and the model's
    fingerprint."""
    spec = model if isinstance(model, str) else None
    if spec is not None:
        model = build_model(spec, weights=weights)
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"fxfeat.extract takes an nn.Module, an extractor or a model name, not "
                                f"{type(model).__name__}.", hint="e.g. fxfeat.extract('timm:resnet50', ...).")
    fingerprint = model_fingerprint(model)
    if isinstance(model, FeatureGraphModule):
        if features != "pooled" or out_indices is not None or levels is not None or output_stride is not None:
            raise InvalidRequestError("an extractor fxfeat.compile returned has fixed outputs; features, "
                                      "out_indices, levels and output_stride choose them from a model.",
                                      hint="pass the model instead, or leave those arguments out.")
        extractor, specs = model, extractor_features(model, pool)
        preprocessing = transform if isinstance(transform, Preprocessing) else None if transform is not None else \
            resolve_preprocessing(model, input_size or extractor.input_size, spec=spec)
        return extractor, specs, preprocessing, fingerprint
    preprocessing = transform if isinstance(transform, Preprocessing) else None if transform is not None else \
        resolve_preprocessing(model, input_size, spec=spec)
    size = _compile_size(model, input_size, preprocessing)
    arguments = dict(pool=pool, out_indices=out_indices, levels=levels, output_stride=output_stride)
    try:
        extractor, specs = build_extractor(model, features, input_size=size, **arguments)
    except ShapePropagationError as error:
        if size == input_size:
            raise
        # The model does not run at its preprocessing's size (a ViT built for another size than its weights'
        # transforms make): the size it was built for wins, and the preprocessing is made for that size.
        extractor, specs = build_extractor(model, features, input_size=None, **arguments)
        warnings.warn(f"{type(model).__name__} does not run at the size its preprocessing ({preprocessing.source}) "
                      f"makes, {size[1]}x{size[2]} ({type(error.cause).__name__}: {error.cause}); it is compiled at "
                      f"its own {extractor.input_size[1]}x{extractor.input_size[2]} and the preprocessing made for "
                      "that size.", FxFeatWarning, stacklevel=3)
    if transform is None:
        if tuple(extractor.input_size[1:]) != tuple(preprocessing.size):  # asked again, of the library if it can
            preprocessing = resolve_preprocessing(model, extractor.input_size, spec=spec)
        preprocessing = preprocessing.for_channels(extractor.input_size[0])
    return extractor, specs, preprocessing, fingerprint


def _compile_size(model: nn.Module, input_size: tuple[int, int, int] | None,
                  preprocessing: Preprocessing | LibraryTransform | None) -> tuple[int, int, int] | None:
    """The size to compile the extractor for: ``input_size`` if given, else the preprocessing's (the size of the
    images the model is given), with the number of channels the model declares; ``None`` (the model's own) where
    the two agree or there is no preprocessing to go by, so that compile resolves the channels itself."""
    if input_size is not None or preprocessing is None:
        return input_size
    declared = make_request(model).input_size
    return None if tuple(declared[1:]) == tuple(preprocessing.size) else (declared[0], *preprocessing.size)


def _config(fingerprint, preprocessing, transform, specs, stored, source, shard_size, compute) -> dict[str, Any]:
    """What must match between runs into one directory (:func:`fxfeat.extraction.format.configuration`)."""
    return configuration(
        model=fingerprint,
        preprocessing=preprocessing.as_dict() if preprocessing is not None else {"transform": repr(transform)},
        features={spec.name: feature_entry(spec.shape(), stored, spec.pool, spec.info) for spec in specs},
        data=source.describe(), shard_size=shard_size, compute_dtype=compute)


def _tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        raise MissingDependencyError("fxfeat.extract shows its progress with tqdm.",
                                     hint="pip install 'fxfeat[extract]' (tqdm, pyarrow and pandas).") from None
    return tqdm


def _nothing_written(out: str, manifest: dict[str, Any]) -> ExtractError:
    """The error of a run whose output holds no row: every image it read failed."""
    skipped = manifest["skipped"]
    reasons = "; ".join(f"{entry['path'] or entry['id']}: {entry['reason']}" for entry in skipped[:3])
    return ExtractError(
        f"no image could be read: {out} holds no row of the {len(skipped)} images tried (first: {reasons}).",
        hint=f"check the data (every skipped image and its reason is in {out}/manifest.json), then rerun.")

