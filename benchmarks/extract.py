"""Benchmark of ``fxfeat extract``: images/s against the loop a timm user writes today, and the two limits.

Side by side in one run, on a generated folder of JPEGs of mixed sizes (photo-like, 333x500 to 1024x768), for each
model:

- ``fxfeat extract``: ``fxfeat.extract(model, list_file, out, features="pooled")`` with its defaults
  (``optimize_for_inference``, float16 rows, torchvision.io decoding in the workers);
- ``timm loop``: what a timm user writes: timm's eval transform (PIL) in a Dataset, a DataLoader with the same
  workers and batch size, ``model.forward_head(model.forward_features(x), pre_logits=True)`` under
  ``torch.inference_mode()``, rows cast to float16 and ``np.save``d per part;
- ``model limit``: fxfeat's extractor alone on decoded, preprocessed batches already in memory (and timm's
  model alone, the hand loop's limit);
- ``decode limit``: fxfeat's decoding and preprocessing alone, in the same DataLoader workers (and timm's PIL
  transform alone).

Each method runs ``--rounds`` times, interleaved, and keeps its best round. Then peak RSS of ``fxfeat extract`` (in
a fresh process each, main process and workers) for two dataset sizes, which must stay within 10% of each other.

Usage::

    python -m benchmarks.extract --out docs/extract.json --markdown docs/extract.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


def fxfeat_extract(model, list_file: str, out: str, workers: int, batch: int, device: str) -> dict:
    import fxfeat

    started = time.perf_counter()
    summary = fxfeat.extract(model, list_file, out, features="pooled", batch_size=batch, num_workers=workers,
                             overwrite=True, progress=False, device=device)
    return {"images_per_second": summary.images_per_second, "wall_s": time.perf_counter() - started,
            "images": summary.images}


class _TimmFiles(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def timm_loop(model, paths: list[str], out: str, workers: int, batch: int, device: str,
              shard_size: int = 10_000) -> dict:
    """The loop a timm user writes (see the module docstring)."""
    import timm

    started = time.perf_counter()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    model = model.to(device)
    loader = torch.utils.data.DataLoader(_TimmFiles(paths, transform), batch_size=batch, num_workers=workers,
                                         pin_memory=device == "cuda")
    os.makedirs(out, exist_ok=True)
    rows, part, count = [], 0, 0
    loop_started = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"):
                features = model.forward_head(model.forward_features(x), pre_logits=True)
            rows.append(features.half().cpu().numpy())
            count += len(x)
            if sum(len(r) for r in rows) >= shard_size:
                np.save(f"{out}/part-{part:05d}.npy", np.concatenate(rows))
                rows, part = [], part + 1
    if rows:
        np.save(f"{out}/part-{part:05d}.npy", np.concatenate(rows))
    loop_seconds = time.perf_counter() - loop_started
    model.cpu()
    return {"images_per_second": count / loop_seconds, "wall_s": time.perf_counter() - started, "images": count}


def model_limits(model, paths: list[str], batch: int, device: str, batches: int) -> dict:
    """Images/s of fxfeat's extractor (as extract builds it) and of timm's model on preprocessed batches."""
    import fxfeat
    from fxfeat.extraction.decode import decode
    from fxfeat.extraction.preprocess import resolve_preprocessing

    steps = resolve_preprocessing(model)
    images = [steps(decode(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)))
              for path in paths[:batch]]
    x = steps.normalize(torch.stack(images)).to(device)
    extractor = fxfeat.compile(model, mode="pooled")
    from fxfeat.optimize import inference_copy

    fast = fxfeat.optimize_for_inference(inference_copy(extractor).to(device),
                                         dtype=torch.float16 if device == "cuda" else None)
    timm_model = model.to(device)
    results = {}
    for label, run in (("fxfeat", lambda: fast(x)),
                       ("timm", lambda: timm_model.forward_head(timm_model.forward_features(x), pre_logits=True))):
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=device == "cuda"
                                                    and label == "timm"):
            run()
            _synchronize(device)
            started = time.perf_counter()
            for _ in range(batches):
                run()
            _synchronize(device)
        results[label] = batches * batch / (time.perf_counter() - started)
    model.cpu()
    return results


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def decode_limits(model, paths: list[str], workers: int, batch: int) -> dict:
    """Images/s of fxfeat's decoding and preprocessing alone, and of timm's PIL transform alone."""
    import timm

    from fxfeat.extraction.loop import _Batch, _Images
    from fxfeat.extraction.preprocess import resolve_preprocessing
    from fxfeat.extraction.sources import open_source

    results = {}
    source = open_source(_list_file(paths, Path(tempfile.mkdtemp()) / "list.txt"))
    datasets = {
        "fxfeat": (_Images(source, resolve_preprocessing(model), None, 3), _Batch),
        "timm": (_TimmFiles(paths, timm.data.create_transform(**timm.data.resolve_data_config(model=model))), None),
    }
    for label, (dataset, collate) in datasets.items():
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
        started = time.perf_counter()
        count = sum(len(getattr(item, "ids", item)) for item in loader)
        results[label] = count / (time.perf_counter() - started)
    return results


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
    all_paths = make_images(work / "images", max([args.images, *args.rss_images]))
    paths = all_paths[: args.images]
    list_file = _list_file(paths, work / "bench.txt")
    results = {"device": device_name(torch.device(args.device)), "versions": _versions(),
               "date": datetime.date.today().isoformat(),
               "settings": {"images": args.images, "workers": args.workers, "batch_size": args.batch_size,
                            "rounds": args.rounds, "cpus": os.cpu_count()}, "models": {}}
    for name in args.models:
        model = build(name)
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for label, method, source, out in (("fxfeat extract", fxfeat_extract, list_file, "out-fxfeat"),
                                               ("timm loop", timm_loop, paths, "out-timm")):
                measured = method(model, source, str(work / out), args.workers, args.batch_size, args.device)
                print(f"{name} {label}: {measured['images_per_second']:.1f} images/s", flush=True)
                if label not in best or measured["images_per_second"] > best[label]["images_per_second"]:
                    best[label] = measured
        limits = {"model": model_limits(model, paths, args.batch_size, args.device, args.limit_batches),
                  "decode": decode_limits(model, paths, args.workers, args.batch_size)}
        ratio = best["fxfeat extract"]["images_per_second"] / best["timm loop"]["images_per_second"]
        lower = min(limits["model"]["fxfeat"], limits["decode"]["fxfeat"])
        results["models"][name] = {**best, "limits": limits, "speedup_over_timm_loop": ratio,
                                   "fraction_of_lower_limit": best["fxfeat extract"]["images_per_second"] / lower}
        print(f"{name}: {ratio:.2f}x the timm loop; limits {limits}", flush=True)
        shutil.rmtree(work / "out-fxfeat", ignore_errors=True)
        shutil.rmtree(work / "out-timm", ignore_errors=True)
    if args.rss_images:
        results["rss"] = {"model": args.rss_model, "runs": {
            count: peak_rss(args.rss_model, all_paths[:count], args.workers, args.batch_size, work)
            for count in args.rss_images}}
        print(f"peak RSS: {results['rss']}", flush=True)
    return results


def write_markdown(results: dict, path: str) -> None:
    settings = results["settings"]
    lines = [
        "# `fxfeat extract` benchmark",
        "",
        f"Measured by `python -m benchmarks.extract` on {results['date']}: {results['device']}, torch "
        f"{results['versions']['torch']}, timm {results['versions'].get('timm')}. {settings['images']} generated "
        f"photo-like JPEGs of mixed sizes (333x500 to 1024x768), batch {settings['batch_size']}, "
        f"{settings['workers']} DataLoader workers for both loops, random weights, pooled features written as "
        f"float16; best of {settings['rounds']} interleaved rounds. Images/s of the loop (the extractor is built "
        "before it starts; wall time with building in the last column).",
        "",
        "| model | fxfeat extract | timm loop | fxfeat / timm | model limit (fxfeat / timm) | decode limit "
        "(fxfeat / timm) | fxfeat of the lower fxfeat limit | wall s (fxfeat / timm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["models"].items():
        fxfeat, timm = row["fxfeat extract"], row["timm loop"]
        model, decode = row["limits"]["model"], row["limits"]["decode"]
        lines.append(
            f"| {name} | {fxfeat['images_per_second']:.1f} | {timm['images_per_second']:.1f} | "
            f"**{row['speedup_over_timm_loop']:.2f}x** | {model['fxfeat']:.1f} / {model['timm']:.1f} | "
            f"{decode['fxfeat']:.1f} / {decode['timm']:.1f} | {row['fraction_of_lower_limit']:.0%} | "
            f"{fxfeat['wall_s']:.1f} / {timm['wall_s']:.1f} |")
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
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224"])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--limit-batches", type=int, default=4, help="batches timed for the model limit")
    parser.add_argument("--device", default="cpu")
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
