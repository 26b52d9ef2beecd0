"""The HTTP row of ``benchmarks/extract.py``: ``fxfeat extract`` of WebDataset tar shards served by a local HTTP
server (the standard library's, with byte ranges: :mod:`benchmarks.range_server`) against the same shards read from
disk, wall time of the whole call (the listing of the shards, building the extractor and the loop), with a light
model so that reading weighs as much as it can. The goal: HTTP within 10% of disk. The rows of both runs are
compared bit for bit.

Example (what ``python -m benchmarks.extract --http-images 512`` adds to its report, as ``"http"``)::

    {"model": "resnet18", "input_size": 128, "images": 512, "shards": 8, "disk": {"wall_s": ...},
     "http": {"wall_s": ..., "requests": ...}, "http_over_disk": 1.03, "rows_equal": true,
     "goal": {"http wall / disk wall <= 1.1": "met"}}
"""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.range_server import serve_process

__all__ = ["HTTP_GOAL", "http_markdown", "http_row", "write_shards"]

HTTP_GOAL = 1.1


def write_shards(paths: list[str], folder: Path, per_shard: int) -> str:
    """WebDataset shards of ``paths`` (``{index}.jpg`` and a ``cls`` label each); returns their brace pattern."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    count = -(-len(paths) // per_shard)
    for shard in range(count):
        with tarfile.open(folder / f"train-{shard:06d}.tar", "w") as archive:
            for index in range(shard * per_shard, min((shard + 1) * per_shard, len(paths))):
                archive.add(paths[index], arcname=f"{index:08d}.jpg")
                label = str(index % 10).encode()
                info = tarfile.TarInfo(f"{index:08d}.cls")
                info.size = len(label)
                archive.addfile(info, io.BytesIO(label))
    return f"train-{{000000..{count - 1:06d}}}.tar"


def http_row(model: torch.nn.Module, name: str, paths: list[str], work: Path, size: int, workers: int, batch: int,
             rounds: int, per_shard: int = 64) -> dict:
    """Wall time of ``fxfeat.extract`` on the shards from disk and over HTTP, ``rounds`` interleaved rounds (the
    order alternating), the best of each kept."""
    import fxfeat

    pattern = write_shards(paths, work / "http-shards", per_shard)
    runs: dict[str, list[dict]] = {"disk": [], "http": []}
    with serve_process(work / "http-shards") as server:
        sources = {"disk": str(work / "http-shards" / pattern), "http": f"{server.url}/{pattern}"}
        for round_ in range(rounds):
            for label in ("disk", "http") if round_ % 2 == 0 else ("http", "disk"):
                requests = len(server.log)
                started = time.perf_counter()
                summary = fxfeat.extract(model, sources[label], str(work / f"out-{label}"), input_size=(3, size, size),
                                         batch_size=batch, num_workers=workers, overwrite=True, progress=False,
                                         compute_dtype=torch.float32)
                wall = time.perf_counter() - started
                runs[label].append({"wall_s": wall, "images": summary.images,
                                    "images_per_second": summary.images_per_second,
                                    **({"requests": len(server.log) - requests} if label == "http" else {})})
                print(f"{name} {size}px {label} shards: {wall:.2f} s wall", flush=True)
    rows = {label: np.asarray(fxfeat.load_features(work / f"out-{label}")[0]["pooled"]) for label in runs}
    best = {label: min(measured, key=lambda run: run["wall_s"]) for label, measured in runs.items()}
    ratio = best["http"]["wall_s"] / best["disk"]["wall_s"]
    for label in runs:
        shutil.rmtree(work / f"out-{label}", ignore_errors=True)
    return {"model": name, "input_size": size, "images": len(paths), "shards": -(-len(paths) // per_shard),
            "per_shard": per_shard, "workers": workers, "batch_size": batch, **best, "rounds": runs,
            "http_over_disk": ratio, "rows_equal": bool(np.array_equal(rows["disk"], rows["http"])),
            "goal": {f"http wall / disk wall <= {HTTP_GOAL}": "met" if ratio <= HTTP_GOAL else "missed"}}


def http_markdown(row: dict) -> list[str]:
    """The report's lines for :func:`http_row`'s result."""
    disk, http = row["disk"], row["http"]
    goal, state = next(iter(row["goal"].items()))
    rounds = {label: ", ".join(f"{run['wall_s']:.2f}" for run in runs) for label, runs in row["rounds"].items()}
    return [
        "", f"Tar shards served by a local HTTP server (Python's http.server with byte ranges, a process of its own on "
        "this machine) "
        f"against the same shards on disk: {row['model']} at {row['input_size']} px, {row['images']} images in "
        f"{row['shards']} shards of {row['per_shard']}, batch {row['batch_size']}, {row['workers']} workers, "
        "float32 compute; wall time of the whole `fxfeat.extract` call (listing the shards, building the "
        "extractor, the loop), best of the interleaved rounds:", "",
        "| shards from | wall s | images/s of the loop | HTTP requests |", "|---|---|---|---|",
        f"| disk | {disk['wall_s']:.2f} | {disk['images_per_second']:.1f} | |",
        f"| HTTP | {http['wall_s']:.2f} | {http['images_per_second']:.1f} | {http['requests']} |", "",
        f"HTTP / disk wall time: **{row['http_over_disk']:.3f}** ({goal}: **{state}**); rows bit-equal: "
        f"{'yes' if row['rows_equal'] else '**no**'}. Every round (wall s): disk {rounds['disk']}; HTTP "
        f"{rounds['http']}.",
    ]
