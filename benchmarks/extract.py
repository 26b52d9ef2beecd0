"""Benchmark of ``fxfeat extract``: images/s against the loop a timm or open_clip user writes today, and the two
limits.

Side by side in one run, on a generated folder of JPEGs of mixed sizes (photo-like, 333x500 to 1024x768), for each
timm model:

- ``fxfeat extract``: ``fxfeat.extract(model, list_file, out, features="pooled")`` with its defaults
  (``optimize_for_inference``, float16 rows, torchvision.io decoding in the workers);
- ``timm loop``: what a timm user writes: timm's eval transform (PIL) in a Dataset, a DataLoader with the same
  workers and batch size, ``model.forward_head(model.forward_features(x), pre_logits=True)`` under
  ``torch.inference_mode()``, rows cast to float16 and ``np.save``d per part;
- ``model limit``: fxfeat's extractor alone on decoded, preprocessed batches already in memory (and timm's
  model alone, the hand loop's limit);
- ``decode limit``: fxfeat's decoding and preprocessing alone, in the same DataLoader workers (and timm's PIL
  transform alone).

and for each ``open_clip:ARCH`` (the embedding case; random weights: the whole open_clip model built with seed 0
and saved as a checkpoint that both sides load):

- ``fxfeat extract``: ``fxfeat.extract("open_clip:ARCH", list_file, out, features="embedding", weights=CHECKPOINT)``,
  the call ``python -m fxfeat extract open_clip:ARCH LIST --features embedding --weights CHECKPOINT`` makes, with
  its defaults (the image tower ``model.visual``: ``encode_image`` unnormalised);
- ``open_clip loop``: what an open_clip user writes (as clip-retrieval's inference does):
  ``open_clip.create_model_and_transforms(ARCH, pretrained=CHECKPOINT)``, its eval transform on PIL images in a
  Dataset, a DataLoader with the same workers and batch size, ``model.encode_image(x)`` under
  ``torch.inference_mode()``, rows cast to float16 and ``np.save``d per part;
- the model limit (fxfeat's extractor of the tower, ``mode="embedding"``, against ``encode_image``) and the decode
  limit (against open_clip's PIL transform), as above.

Both sides compute in float32 on the CPU (float16 on a GPU, as fxfeat does there) and write float16 rows (fxfeat's
default, and what clip-retrieval writes). Every fxfeat row is compared with the hand loop's row of the same path: the
lowest cosine is reported, with the goals (fxfeat at least 1.2x the hand loop, every cosine at least 0.9999) as
met or missed; nothing is asserted (a benchmark is not a test).

Each method runs ``--rounds`` times, interleaved, and keeps its best round. Then the HTTP row
(:mod:`benchmarks.extract_http`: ``--http-model`` at ``--http-size`` px on ``--http-images`` images as tar shards,
served by a local HTTP server against the same shards on disk, wall time including the listing; goal: HTTP within
10% of disk). Then peak RSS of ``fxfeat extract`` (in
a fresh process each, main process and workers) for two dataset sizes, which must stay within 10% of each other.

Usage::

    python -m benchmarks.extract --images 512 --out docs/extract.json --markdown docs/extract-benchmark.md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

OPEN_CLIP = "open_clip:"
SPEEDUP_GOAL, COSINE_GOAL = 1.2, 0.9999
# With bfloat16 compute allowed (issue 30): (over the float32 hand loop, over its bfloat16 cast) per model, and the
# lowest row cosine to the float32 loop's rows that bfloat16 rounding allows.
BFLOAT16_GOALS = {"resnet50": (4.0, 1.3), "open_clip:ViT-B-32": (3.0, 1.0)}
BFLOAT16_COSINE_GOAL = 0.999
SIZES = [(375, 500), (480, 640), (500, 333), (600, 800), (768, 1024), (427, 640), (640, 480)]  # (height, width)


def make_images(folder: Path, count: int) -> list[str]:
    """``count`` photo-like JPEGs of mixed sizes in ``folder`` (made once, reused), sorted paths."""
    folder.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    paths = []
    for index in range(count):
        path = folder / f"{index // 1000:03d}" / f"{index:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            rng = np.random.default_rng(index)
            height, width = SIZES[index % len(SIZES)]
            coarse = (rng.random((height // 24 + 1, width // 24 + 1, 3)) * 255).astype(np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
            grain = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
            Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def _list_file(paths: list[str], where: Path) -> str:
    where.write_text("\n".join(paths))
    return str(where)


def build(name: str) -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


@dataclasses.dataclass
class Case:
    """One model of the benchmark: what ``fxfeat extract`` is given, and the pieces of the loop its user writes."""

    name: str
    library: str  # the hand loop's library: "timm" or "open_clip"; its loop is named "<library> loop"
    features: str  # fxfeat's feature, and the mode its extractor is compiled with for the model limit
    model: torch.nn.Module  # the hand loop's model (on the device for the model limit)
    tower: torch.nn.Module  # what fxfeat compiles for the limits: the timm model itself, open_clip's image tower
    forward: Callable[[torch.Tensor], torch.Tensor]  # the hand loop's forward on a preprocessed batch
    transform: Callable  # the hand loop's eval transform of a PIL image
    given: torch.nn.Module | str  # fxfeat.extract's model
    weights: str  # fxfeat.extract's weights, for a model name
    loop: Callable[..., dict]  # the hand loop: (paths, out, workers, batch, device) -> measured

    @property
    def peer(self) -> str:
        return f"{self.library} loop"


def timm_case(name: str) -> Case:
    """A timm model with random weights (seed 0), given to both sides as built; pooled features."""
    import timm

    model = build(name)
    return Case(name, "timm", "pooled", model, model,
                lambda x: model.forward_head(model.forward_features(x), pre_logits=True),
                timm.data.create_transform(**timm.data.resolve_data_config(model=model)), model, "pretrained",
                functools.partial(timm_loop, model))


def open_clip_case(name: str, work: Path) -> Case:
    """``open_clip:ARCH``: the whole open_clip model built with seed 0 and saved as a checkpoint, which fxfeat loads
    by name (``weights=CHECKPOINT``) and the hand loop through ``create_model_and_transforms``; embeddings."""
    import open_clip

    arch = name.removeprefix(OPEN_CLIP)
    if "/" in arch:
        raise ValueError(f"{name}: the benchmark uses random weights, so it takes an architecture without a tag "
                         f"(open_clip:{arch.partition('/')[0]}).")
    torch.manual_seed(0)
    model, _, transform = open_clip.create_model_and_transforms(arch)
    model.eval()
    checkpoint = str(work / f"open_clip-{arch}.pt")
    torch.save(model.state_dict(), checkpoint)
    return Case(name, "open_clip", "embedding", model, model.visual, model.encode_image, transform, name, checkpoint,
                functools.partial(open_clip_loop, arch, checkpoint))


COMPUTE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}


def fxfeat_extract(case: Case, list_file: str, out: str, workers: int, batch: int, device: str,
                   compute_dtype: str = "float32") -> dict:
    """``fxfeat.extract`` with its defaults but the compute dtype (``--compute-dtype``: float32 by default, as the
    hand loops compute; ``auto`` is ``fxfeat.extract``'s own default, its probe on the CPU)."""
    import fxfeat

    started = time.perf_counter()
    summary = fxfeat.extract(case.given, list_file, out, features=case.features, weights=case.weights,
                             batch_size=batch, num_workers=workers, overwrite=True, progress=False, device=device,
                             compute_dtype=COMPUTE_DTYPES[compute_dtype])
    return {"images_per_second": summary.images_per_second, "wall_s": time.perf_counter() - started,
            "images": summary.images, "compute": summary.compute}


class _PilFiles(torch.utils.data.Dataset):
    """The Dataset a user writes: each file opened with PIL, converted to RGB, through the library's transform."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def _pil_loop(forward, transform, paths: list[str], out: str, workers: int, batch: int, device: str,
              shard_size: int, started: float, dtype: torch.dtype = torch.float32) -> dict:
    """The hand loop's body: a DataLoader over ``_PilFiles``, ``forward`` under ``torch.inference_mode()`` (autocast
    to float16 on a GPU, as fxfeat computes there), float16 rows ``np.save``d per part of ``shard_size``."""
    loader = torch.utils.data.DataLoader(_PilFiles(paths, transform), batch_size=batch, num_workers=workers,
                                         pin_memory=device == "cuda")
    os.makedirs(out, exist_ok=True)
    rows, part, count = [], 0, 0
    loop_started = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, dtype, non_blocking=True)
            with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                features = forward(x)
            rows.append(features.half().cpu().numpy())
            count += len(x)
            if sum(len(r) for r in rows) >= shard_size:
                np.save(f"{out}/part-{part:05d}.npy", np.concatenate(rows))
                rows, part = [], part + 1
    if rows:
        np.save(f"{out}/part-{part:05d}.npy", np.concatenate(rows))
    loop_seconds = time.perf_counter() - loop_started
    return {"images_per_second": count / loop_seconds, "wall_s": time.perf_counter() - started, "images": count}


def timm_loop(model, paths: list[str], out: str, workers: int, batch: int, device: str,
              shard_size: int = 10_000, dtype: torch.dtype = torch.float32) -> dict:
    """The loop a timm user writes (see the module docstring); ``dtype=torch.bfloat16``: the same loop with the
    model and each batch cast to bfloat16 (``model.to(torch.bfloat16)``), the fastest loop a user writes on a CPU
    that computes bfloat16 natively."""
    import timm

    started = time.perf_counter()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    model = model.to(device, dtype)
    measured = _pil_loop(lambda x: model.forward_head(model.forward_features(x), pre_logits=True), transform, paths,
                         out, workers, batch, device, shard_size, started, dtype)
    model.cpu().float()
    return measured


def open_clip_loop(arch: str, checkpoint: str, paths: list[str], out: str, workers: int, batch: int, device: str,
                   shard_size: int = 10_000, dtype: torch.dtype = torch.float32) -> dict:
    """The loop an open_clip user writes (see the module docstring): the model and its eval transform from
    ``create_model_and_transforms`` with the checkpoint, ``encode_image`` on each batch."""
    import open_clip

    started = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint, device=device)
    model.eval().to(dtype)
    return _pil_loop(model.encode_image, preprocess, paths, out, workers, batch, device, shard_size, started, dtype)


def model_limits(case: Case, paths: list[str], batch: int, device: str, batches: int,
                 computed: torch.dtype = torch.float32) -> dict:
    """Images/s of fxfeat's extractor (as extract builds it, computing in ``computed`` on the CPU) and of the hand
    loop's model on preprocessed batches."""
    import fxfeat
    from fxfeat.extraction.decode import decode
    from fxfeat.extraction.preprocess import resolve_preprocessing

    steps = resolve_preprocessing(case.tower)
    images = [steps(decode(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)))
              for path in paths[:batch]]
    x = steps.normalize(torch.stack(images)).to(device)
    extractor = fxfeat.compile(case.tower, mode=case.features)
    from fxfeat.optimize import inference_copy

    fast = fxfeat.optimize_for_inference(inference_copy(extractor).to(device),
                                         dtype=torch.float16 if device == "cuda" else
                                         None if computed == torch.float32 else computed)
    case.model.to(device)
    results = {}
    for label, run in (("fxfeat", lambda: fast(x)), (case.library, lambda: case.forward(x))):
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"
                                                    and label != "fxfeat"):
            run()
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(batches):
                run()
            _synchronize(device)
        results[label] = batches * batch / (time.perf_counter() - started)
    case.model.cpu()
    return results


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_limits(case: Case, paths: list[str], workers: int, batch: int) -> dict:
    """Images/s of fxfeat's decoding and preprocessing alone, and of the hand loop's PIL transform alone."""
    from fxfeat.extraction.loop import _Batch, _Images
    from fxfeat.extraction.preprocess import resolve_preprocessing
    from fxfeat.extraction.sources import open_source

    results = {}
    source = open_source(_list_file(paths, Path(tempfile.mkdtemp()) / "list.txt"))
    datasets = {
        "fxfeat": (_Images(source, resolve_preprocessing(case.tower), None, 3), _Batch),
        case.library: (_PilFiles(paths, case.transform), None),
    }
    for label, (dataset, collate) in datasets.items():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
        started = time.perf_counter()
        count = sum(len(getattr(item, "ids", item)) for item in loader)
        results[label] = count / (time.perf_counter() - started)
    return results


def min_row_cosine(fxfeat_out: Path, feature: str, peer_out: Path, paths: list[str]) -> float:
    """The lowest cosine between fxfeat's row of an image and the hand loop's row of the same path (the hand loop
    writes its rows in the order of ``paths``; fxfeat's metadata names each row's path)."""
    import fxfeat

    arrays, metadata = fxfeat.load_features(fxfeat_out)
    rows = np.asarray(arrays[feature], dtype=np.float64).reshape(len(metadata), -1)
    by_path = dict(zip(metadata["path"], rows))
    ours = np.stack([by_path[path] for path in paths])
    theirs = np.concatenate([np.load(part) for part in sorted(peer_out.glob("part-*.npy"))])
    theirs = theirs.astype(np.float64).reshape(len(theirs), -1)
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    return float(cosine.min())


def peak_rss(model_name: str, paths: list[str], workers: int, batch: int, work: Path) -> dict:
    """Peak RSS (MB) of ``fxfeat extract`` in a fresh process: the main process and its largest worker."""
    list_file = _list_file(paths, work / f"rss-{len(paths)}.txt")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.extract", "--rss-child", model_name, list_file, str(work / "rss-out"),
         str(workers), str(batch)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status_mb(pid: int | str, field: str) -> float:
    """A ``/proc/PID/status`` memory field in MB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_child(model_name: str, list_file: str, out: str, workers: int, batch: int) -> None:
    """Peak RSS of this process (VmHWM: ``ru_maxrss`` would include the parent's, inherited at fork) and of its
    largest DataLoader worker (sampled every 50 ms)."""
    import threading

    import fxfeat

    largest_worker = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            children = []
            for task in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{task}/children") as listed:
                    children += listed.read().split()
            largest_worker[0] = max([largest_worker[0], *(_status_mb(pid, "VmRSS") for pid in children)])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = fxfeat.extract(build(model_name), list_file, out, features=["pooled", "unpooled"], batch_size=batch,
                             num_workers=workers, shard_size=1000, overwrite=True, progress=False)
    done.set()
    sampler.join()
    print(json.dumps({"images": summary.images, "main_mb": _status_mb("self", "VmHWM"),
                      "workers_mb": largest_worker[0]}))


def run(args: argparse.Namespace) -> dict:
    from benchmarks.run import _versions, device_name

    work = Path(args.work)
    if args.http_images is None:
        args.http_images = args.images
    all_paths = make_images(work / "images", max([args.images, args.http_images, *args.rss_images]))
    paths = all_paths[: args.images]
    list_file = _list_file(paths, work / "bench.txt")
    versions = _versions()
    if any(name.startswith(OPEN_CLIP) for name in args.models):
        import open_clip

        versions["open_clip"] = open_clip.__version__
    results = {"device": device_name(torch.device(args.device)), "versions": versions,
               "date": datetime.date.today().isoformat(),
               "settings": {"images": args.images, "workers": args.workers, "batch_size": args.batch_size,
                            "rounds": args.rounds, "cpus": os.cpu_count(), "rows": "float16 on both sides",
                            "fxfeat_compute_dtype": args.compute_dtype,
                            "compute": "float16 on both sides" if args.device == "cuda" else
                            "float32 on both sides" if args.compute_dtype == "float32" else
                            f"the dtype fxfeat chose ({args.compute_dtype}) by fxfeat and float32 by the hand loops "
                            "(and bfloat16 by their cast)"}, "models": {}}
    for name in args.models:
        case = open_clip_case(name, work) if name.startswith(OPEN_CLIP) else timm_case(name)
        best: dict[str, dict] = {}
        methods = [("fxfeat extract", functools.partial(fxfeat_extract, case, compute_dtype=args.compute_dtype),
                    list_file, "out-fxfeat"), (case.peer, case.loop, paths, "out-peer")]
        if args.compute_dtype != "float32":  # the hand loop with its model cast to bfloat16, beside the float32 one
            methods.append((f"{case.peer} bfloat16", functools.partial(case.loop, dtype=torch.bfloat16), paths,
                            "out-peer-bfloat16"))
        for _ in range(args.rounds):
            for label, method, source, out in methods:
                measured = method(source, str(work / out), args.workers, args.batch_size, args.device)
                print(f"{name} {label}: {measured['images_per_second']:.1f} images/s", flush=True)
                if label not in best or measured["images_per_second"] > best[label]["images_per_second"]:
                    best[label] = measured
        cosine = min_row_cosine(work / "out-fxfeat", case.features, work / "out-peer", paths)
        computed = best["fxfeat extract"].get("compute", {}).get("dtype", "float32")
        limits = {"model": model_limits(case, paths, args.batch_size, args.device, args.limit_batches,
                                        getattr(torch, computed)),
                  "decode": decode_limits(case, paths, args.workers, args.batch_size)}
        ratio = best["fxfeat extract"]["images_per_second"] / best[case.peer]["images_per_second"]
        lower = min(limits["model"]["fxfeat"], limits["decode"]["fxfeat"])
        results["models"][name] = {
            "peer": case.peer, "features": case.features, **best, "limits": limits,
            f"speedup_over_{case.library}_loop": ratio, **({
                f"speedup_over_{case.library}_loop_bfloat16": best["fxfeat extract"]["images_per_second"]
                / best[f"{case.peer} bfloat16"]["images_per_second"]} if len(methods) > 2 else {}),
            "fraction_of_lower_limit": best["fxfeat extract"]["images_per_second"] / lower,
            "min_row_cosine": cosine,
            "goals": _goals(name, case.peer, ratio, cosine, results["models"].get(name), len(methods) > 2)}
        if len(methods) > 2:
            row = results["models"][name]
            row["goals"] = _goals(name, case.peer, ratio, cosine,
                                  row[f"speedup_over_{case.library}_loop_bfloat16"], True)
        if isinstance(case.given, str):
            results["models"][name]["fxfeat_command"] = (
                f"python -m fxfeat extract {case.given} LIST --out DIR --features {case.features} --weights "
                f"CHECKPOINT --batch-size {args.batch_size} --workers {args.workers} --device {args.device} --quiet")
        print(f"{name}: {ratio:.2f}x the {case.peer}; lowest row cosine {cosine:.6f}; limits {limits}; fxfeat "
              f"computed {best['fxfeat extract']['compute']}", flush=True)
        if len(methods) > 2:
            print(f"{name}: {results['models'][name][f'speedup_over_{case.library}_loop_bfloat16']:.2f}x the "
                  f"{case.peer} bfloat16", flush=True)
        shutil.rmtree(work / "out-fxfeat", ignore_errors=True)
        shutil.rmtree(work / "out-peer", ignore_errors=True)
        shutil.rmtree(work / "out-peer-bfloat16", ignore_errors=True)
        if isinstance(case.given, str):
            Path(case.weights).unlink()
    if args.http_images:
        from benchmarks.extract_http import http_row

        results["http"] = http_row(build(args.http_model), args.http_model, all_paths[: args.http_images], work,
                                   args.http_size, args.workers, args.batch_size, max(args.rounds, 1))
        print(f"HTTP shards: {results['http']['http_over_disk']:.3f}x the disk's wall time", flush=True)
    if args.rss_images:
        results["rss"] = {"model": args.rss_model, "runs": {
            count: peak_rss(args.rss_model, all_paths[:count], args.workers, args.batch_size, work)
            for count in args.rss_images}}
        print(f"peak RSS: {results['rss']}", flush=True)
    return results


def _met(condition: bool) -> str:
    return "met" if condition else "missed"


def _goals(name: str, peer: str, ratio: float, cosine: float, over_cast: float | None, bfloat16: bool) -> dict:
    """The goals of a row, met or missed: with float32 compute, 1.2x the hand loop and rows equal to its rows
    (cosine 0.9999); where fxfeat may compute in bfloat16, the model's targets over the float32 loop and over the
    loop cast to bfloat16, and rows within bfloat16 rounding (cosine 0.999)."""
    if not bfloat16:
        return {f"fxfeat / {peer} >= {SPEEDUP_GOAL}x": _met(ratio >= SPEEDUP_GOAL),
                f"min row cosine >= {COSINE_GOAL}": _met(cosine >= COSINE_GOAL)}
    goals = {f"min row cosine to the float32 {peer} >= {BFLOAT16_COSINE_GOAL}": _met(cosine >= BFLOAT16_COSINE_GOAL)}
    if name in BFLOAT16_GOALS and over_cast is not None:
        over_float32, over_bfloat16 = BFLOAT16_GOALS[name]
        goals[f"fxfeat / {peer} (float32) >= {over_float32}x"] = _met(ratio >= over_float32)
        goals[f"fxfeat / {peer} cast to bfloat16 >= {over_bfloat16}x"] = _met(over_cast >= over_bfloat16)
    return goals


def write_markdown(results: dict, path: str) -> None:
    settings, versions = results["settings"], results["versions"]
    libraries = ", ".join(f"{library} {versions[library]}" for library in ("timm", "open_clip") if library in versions)
    lines = [
        "# `fxfeat extract` benchmark",
        "",
        f"Measured by `python -m benchmarks.extract` on {results['date']}: {results['device']}, torch "
        f"{versions['torch']}, {libraries}. {settings['images']} generated photo-like JPEGs of mixed sizes (333x500 "
        f"to 1024x768), batch {settings['batch_size']}, {settings['workers']} DataLoader workers for both loops, "
        "random weights (an open_clip model's saved as a checkpoint that both loops load), features computed in "
        f"{settings.get('compute', 'float32 on both sides').removesuffix(' on both sides')} and written as float16 "
        "on both sides; best of "
        f"{settings['rounds']} interleaved rounds. Images/s of the loop (the extractor is built before it starts; "
        "wall time with building in the last column). The lowest row cosine is that of fxfeat's row of an image to "
        "the hand loop's row of the same image, over every image.",
    ]
    by_peer: dict[str, list] = {}
    for name, row in results["models"].items():
        by_peer.setdefault(row.get("peer", "timm loop"), []).append((name, row))
    for peer, rows in by_peer.items():
        library = peer.removesuffix(" loop")
        lines += [
            "",
            f"| model | features | fxfeat extract | {peer} | fxfeat / {library} | model limit (fxfeat / {library}) | "
            f"decode limit (fxfeat / {library}) | fxfeat of the lower fxfeat limit | lowest row cosine | wall s "
            f"(fxfeat / {library}) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        cast = [(name, row) for name, row in rows if f"{peer} bfloat16" in row]
        for name, row in rows:
            fxfeat, theirs = row["fxfeat extract"], row[peer]
            model, decode = row["limits"]["model"], row["limits"]["decode"]
            cosine = f"{row['min_row_cosine']:.6f}" if "min_row_cosine" in row else "not measured"
            lines.append(
                f"| {name} | {row.get('features', 'pooled')} | {fxfeat['images_per_second']:.1f} | "
                f"{theirs['images_per_second']:.1f} | **{row[f'speedup_over_{library}_loop']:.2f}x** | "
                f"{model['fxfeat']:.1f} / {model[library]:.1f} | {decode['fxfeat']:.1f} / {decode[library]:.1f} | "
                f"{row['fraction_of_lower_limit']:.0%} | {cosine} | {fxfeat['wall_s']:.1f} / {theirs['wall_s']:.1f} |")
        if cast:
            lines += ["", f"With bfloat16 allowed: fxfeat extract's compute dtype and why, and the {peer} with its "
                      "model and batches cast to bfloat16 (the fastest loop its user writes on this CPU):", "",
                      f"| model | fxfeat computed in | fxfeat extract | {peer} (float32) | {peer} cast to bfloat16 | "
                      f"fxfeat / float32 loop | fxfeat / bfloat16 loop |", "|---|---|---|---|---|---|---|"]
        for name, row in cast:
            from fxfeat.extraction.compute_dtype import describe_compute

            fxfeat, cast_loop = row["fxfeat extract"], row[f"{peer} bfloat16"]
            lines.append(
                f"| {name} | {describe_compute(fxfeat['compute'])} | {fxfeat['images_per_second']:.1f} | "
                f"{row[peer]['images_per_second']:.1f} | {cast_loop['images_per_second']:.1f} | "
                f"**{row[f'speedup_over_{library}_loop']:.2f}x** | "
                f"**{row[f'speedup_over_{library}_loop_bfloat16']:.2f}x** |")
    goals = [(name, goal, state) for name, row in results["models"].items()
             for goal, state in row.get("goals", {}).items()]
    if goals:
        lines += ["", "Goals:", ""] + [f"- {name}: {goal}: **{state}**" for name, goal, state in goals]
    commands = [(name, row["fxfeat_command"]) for name, row in results["models"].items() if "fxfeat_command" in row]
    if commands:
        lines += ["", "`fxfeat extract` of a model given by name is the call the command line makes:", ""]
        lines += [f"- {name}: `{command}`" for name, command in commands]
    if "http" in results:
        from benchmarks.extract_http import http_markdown

        lines += http_markdown(results["http"])
    if "rss" in results:
        runs = results["rss"]["runs"]
        lines += ["", f"Peak RSS of `fxfeat extract` ({results['rss']['model']}, pooled and unpooled features, parts "
                  "of 1000 images, a fresh process each):", "", "| images | main process MB | largest worker MB |",
                  "|---|---|---|"]
        lines += [f"| {count} | {run['main_mb']:.0f} | {run['workers_mb']:.0f} |" for count, run in runs.items()]
        counts = sorted(runs, key=int)
        growth = runs[counts[-1]]["main_mb"] / runs[counts[0]]["main_mb"] - 1
        lines += ["", f"Main process peak RSS at {counts[-1]} images is {growth:+.1%} of that at {counts[0]}."]
    Path(path).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--rss-child":
        _rss_child(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet50", "vit_base_patch16_224", "open_clip:ViT-B-32"],
                        help="timm model names and open_clip:ARCH (the embedding case against the open_clip loop)")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=4, help="batches timed for the model limit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default="float32",
                        help="fxfeat extract's compute dtype (float32: as the hand loops compute, the rows above; "
                        "auto: fxfeat's default, its probe on the CPU; bfloat16: forced); other than float32 adds "
                        "the hand loop with its model cast to bfloat16")
    parser.add_argument("--http-images", type=int, default=None,
                        help="images of the HTTP row (default: --images; 0: no HTTP row)")
    parser.add_argument("--http-model", default="resnet18", help="the HTTP row's model (light: reading weighs)")
    parser.add_argument("--http-size", type=int, default=128, help="the HTTP row's input size in pixels")
    parser.add_argument("--rss-images", type=int, nargs="*", default=[2000, 8000])
    parser.add_argument("--rss-model", default="resnet18")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "fxfeat-extract-bench"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    results = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        write_markdown(results, args.markdown)


if __name__ == "__main__":
    main()
