"""The on-disk format of an extraction, in one place: its layout, its version, the configuration a rerun must
match (with the model's fingerprint), the manifest's schema, and the one check that a part's files are intact.
The writer (:mod:`~fxfeat.extraction.directory`, :mod:`~fxfeat.extraction.parts`) and the reader
(:mod:`~fxfeat.extraction.reader`) know the format only through this module.

Layout, relative to the output directory (clip-retrieval's, which embedding-reader reads)::

    manifest.json                    the configuration, every part's record, complete or not
    <feature>/part-00000.npy         a part's rows of one feature: (rows, *feature shape)
    metadata/part-00000.parquet      the same rows' id, path, label, width, height
    .fxfeat/parts/part-00000.json    a part's record: it is what makes the part count, written after its files
    .fxfeat/tmp/<run>/               files being written by one run (one folder per run and process)
    .fxfeat/lock, .fxfeat/lock.json  a local output's lock, held by the run writing it, and who holds it

Versions (``manifest["format"]``; the reader reads each of them, the writer writes the last):

- ``fxfeat-features/1``: the layout above, with feature folders named by the extraction's own rule.
- ``fxfeat-features/2``: feature folders named by the rule of ``return_dict`` keys and exported outputs
  (:mod:`fxfeat.plan.names`). The two rules name every folder alike except a name two features share (``/1``:
  ``name_1``; ``/2``: the level's node name) and a feature named ``metadata`` (``/1``: ``metadata_feature``;
  ``/2``: its node name, else ``metadata_1``). A ``/1`` directory of the same configuration has the same
  folders: a rerun keeps its parts and writes its manifest as ``/2``.

Example:
    >>> feature_file("layer3", 2), metadata_file(2), record_file(2)
    ('layer3/part-00002.npy', 'metadata/part-00002.parquet', '.fxfeat/parts/part-00002.json')
    >>> feature_names(["layer3.0", "metadata"], fallbacks=["add_7", None])
    ['layer3_0', 'metadata_1']
    >>> check_readable({"format": "fxfeat-features/9"}, "features")
    Traceback (most recent call last):
    ...
    fxfeat.errors.OutputDirectoryError: features was written in format fxfeat-features/9, which this fxfeat ...
    Hint: upgrade fxfeat (pip install -U fxfeat) to read it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fxfeat.errors import OutputDirectoryError
from fxfeat.extraction.filesystem import digest, output_filesystem
from fxfeat.plan.names import output_names
from fxfeat.version import __version__

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = [
    "FORMAT", "FORMATS_READ", "LOCK", "LOCK_HOLDER", "MANIFEST", "METADATA", "METADATA_COLUMNS", "RECORDS", "STATE",
    "STORED_DTYPES", "TEMPORARY", "check_readable", "configuration", "damaged_files", "feature_entry", "feature_file",
    "feature_names", "first_difference", "manifest_of", "metadata_file", "model_fingerprint", "part_name",
    "read_manifest", "record_file", "recorded_configuration", "temporary_folder",
]

FORMAT = "fxfeat-features/2"
FORMATS_READ = ("fxfeat-features/1", FORMAT)

MANIFEST = "manifest.json"
METADATA = "metadata"
STATE = ".fxfeat"  # fxfeat's own files in the output: part records and temporary files
RECORDS = f"{STATE}/parts"
TEMPORARY = f"{STATE}/tmp"
LOCK = f"{STATE}/lock"  # held by the run writing a local output (fxfeat.extraction.lock); never removed
LOCK_HOLDER = f"{STATE}/lock.json"  # who holds it
# The dtype rows of each dtype asked for are written in (numpy has no bfloat16).
STORED_DTYPES = {torch.float16: torch.float16, torch.float32: torch.float32, torch.bfloat16: torch.float32}
# The metadata's columns and their arrow types, in order.
METADATA_COLUMNS = (("id", "int64"), ("path", "string"), ("label", "int64"), ("width", "int32"),
                    ("height", "int32"))


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def feature_file(name: str, part: int) -> str:
    return f"{name}/{part_name(part)}.npy"


def metadata_file(part: int) -> str:
    return f"{METADATA}/{part_name(part)}.parquet"


def record_file(part: int) -> str:
    return f"{RECORDS}/{part_name(part)}.json"


def temporary_folder(run: str) -> str:
    """Where one run's process writes the files of its parts before they are renamed into place."""
    return f"{TEMPORARY}/{run}"


def feature_names(labels: Sequence[str], fallbacks: Sequence[str | None] | None = None) -> list[str]:
    """The folders of features labelled ``labels`` (the names asked for, or the levels' module paths), by the
    rule of ``return_dict`` keys (:mod:`fxfeat.plan.names`), none of them ``metadata``."""
    return output_names(labels, fallbacks, reserved=(METADATA,))


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """What identifies a model in the configuration: its class and the sha256 over its state dict (every entry's
    name, dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "weights_sha256": digest.hexdigest()}


def feature_entry(shape: Sequence[int], stored: torch.dtype, pool: str | None,
                  info: dict[str, Any]) -> dict[str, Any]:
    """A feature in the configuration: its per-image ``shape`` as written, its stored dtype, the ``pool`` that
    made a map a vector (or ``None``), and the extractor's ``feature_info`` entry it comes from."""
    return {"shape": list(shape), "dtype": str(stored).removeprefix("torch."), "pool": pool, "feature_info": info}


def configuration(model: dict[str, str], preprocessing: dict[str, Any], features: dict[str, dict[str, Any]],
                  data: dict[str, Any], shard_size: int, compute_dtype: str) -> dict[str, Any]:
    """What must match between runs into one directory, as JSON gives it back: the model's fingerprint, the
    preprocessing, per feature (its folder's name) its :func:`feature_entry`, the data listing's description, the
    images per part, and the dtype the extractor computes in (``"float32"``, ``"bfloat16"``, ``"float16"``)."""
    config = {"model": model, "preprocessing": preprocessing, "features": features, "data": data,
              "shard_size": shard_size, "compute_dtype": compute_dtype}
    return json.loads(json.dumps(config))


def recorded_configuration(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """A manifest's configuration in this fxfeat's schema: one written before the compute dtype was part of it
    gets the compute dtype its parts' records name, where they name one."""
    config = manifest.get("config")
    if config is None or "compute_dtype" in config:
        return config
    computed = {(record.get("run") or {}).get("compute_dtype") for record in manifest.get("parts", [])}
    return {**config, "compute_dtype": computed.pop()} if len(computed) == 1 else config


def first_difference(there: Any, now: Any, where: str = "") -> tuple[str, Any, Any] | None:
    """``(key path, value there, value now)`` of the first difference of two configurations, or ``None``."""
    if there == now:
        return None
    if isinstance(there, dict) and isinstance(now, dict):
        for key in [*there, *(key for key in now if key not in there)]:
            if there.get(key) != now.get(key):
                return first_difference(there.get(key), now.get(key), f"{where}.{key}" if where else key)
    return where or "the configuration", there, now


def manifest_of(config: dict[str, Any], parts: int, records: list[dict[str, Any]], complete: bool | None,
             started: float | None) -> dict[str, Any]:
    """The manifest of an output holding ``records`` (the parts recorded, in order) of ``parts``: complete when
    every part is recorded (or as ``complete`` says)."""
    return {
        "format": FORMAT, "fxfeat_version": __version__,
        "complete": len(records) == parts if complete is None else complete, "started": started,
        "updated": time.time(), "parts_total": parts, "parts_done": len(records),
        "images": sum(record["count"] for record in records),
        "skipped": [entry for record in records for entry in record["skipped"]],
        "config": config, "parts": records,
    }


def read_manifest(path: str, files: AbstractFileSystem | None = None) -> dict[str, Any] | None:
    """The manifest of the output directory ``path`` (on the filesystem ``files``, by default its path's), or
    ``None`` where there is none."""
    files = files if files is not None else output_filesystem(path)
    manifest = f"{path}/{MANIFEST}"
    if not files.isfile(manifest):
        return None
    with files.open(manifest, "rb") as handle:
        return json.load(handle)


def check_readable(manifest: dict[str, Any] | None, path: str) -> None:
    """Raise :class:`~fxfeat.OutputDirectoryError` unless ``manifest`` is one of a format this fxfeat reads."""
    if manifest is None or not str(manifest.get("format", "")).startswith("fxfeat-features/"):
        raise OutputDirectoryError(f"{path} is not an fxfeat extraction (no {MANIFEST} of format {FORMAT}).",
                                   hint="pass the directory fxfeat.extract(..., out=DIR) wrote.")
    if manifest["format"] not in FORMATS_READ:
        raise OutputDirectoryError(
            f"{path} was written in format {manifest['format']}, which this fxfeat ({__version__}) does not read "
            f"(it reads {', '.join(FORMATS_READ)}).", hint="upgrade fxfeat (pip install -U fxfeat) to read it.")


def damaged_files(files: AbstractFileSystem, root: str, record: dict[str, Any], checksums: bool) -> list[str]:
    """The files of a part's ``record`` (paths relative to ``root``) that are missing, of another size, or, with
    ``checksums``, of other bytes: the part is intact when there are none."""
    damaged = []
    for relative, described in record["files"].items():
        path = f"{root}/{relative}"
        if not files.isfile(path) or files.size(path) != described["bytes"] or \
                checksums and digest(files, path) != described["sha256"]:
            damaged.append(relative)
    return damaged
