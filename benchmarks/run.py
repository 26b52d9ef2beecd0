"""Benchmark harness: fxfeat vs timm ``features_only`` vs torchvision ``create_feature_extractor`` vs the limit.

For every model, setting and batch size, in one process: build time, a correctness check against the eager
model's own features (a fast wrong answer cannot win), peak memory of a forward (after a first call at that
shape, which compiles or packs weights), latency (median and IQR,
``torch.utils.benchmark``, CUDA-synchronised) and throughput of each method (see ``benchmarks.methods``). The
methods of one configuration are timed in interleaved rounds, so drifting machine load hits them alike; each
keeps its best round.
Writes JSON (device, versions, settings, every measurement), a Markdown report and a PNG plot of each method's
latency relative to the limit.

Usage::

    python -m benchmarks.run --device cpu --batch-sizes 1 8 --out docs/benchmarks.json \\
        --markdown docs/benchmarks.md --plot docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import warnings

import torch

from benchmarks.measure import check, with_autocast
from benchmarks.methods import LEVERS, EagerPrefix, Setting, build_methods
from benchmarks.report import write_markdown, write_plot
from benchmarks.timing import interleaved_latencies

# timm's builds of issue 13's four models: each is measured against timm's own features_only and, on the same
# weights, torchvision's create_feature_extractor.
DEFAULT_MODELS = ["timm:resnet50", "timm:efficientnet_b0", "timm:convnext_tiny", "timm:regnety_032"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse_out_indices(text: str) -> tuple[int, ...] | None:
    return None if text == "all" else tuple(int(i) for i in text.split(","))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from benchmarks.compile_time import cpu_name

    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def _versions() -> dict:
    import torchvision

    versions = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__)
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return versions


def _reference(eager, setting: Setting, modules: list[str], classifier: str | None):
    """Eager features for the correctness check (``None`` when there is no eager model to ask)."""
    if eager is None:
        return None
    if setting.mode == "pooled":
        return EagerPrefix(eager, [classifier], stop=False, pre=True)
    return EagerPrefix(eager, modules, stop=False)


def run(args: argparse.Namespace) -> dict:
    from fxfeat.models import build_model

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    def prepare(module):
        return module.to(device=device, memory_format=memory_format).eval()

    settings = [Setting(args.mode, out_indices, args.output_stride) for out_indices in args.out_indices]
    total = len(args.models) * len(settings) * len(args.batch_sizes)
    progress = _progress(total, args.quiet)
    rows = []
    for spec in args.models:
        model = prepare(build_model(spec))
        for setting in settings:
            methods = build_methods(spec, model, setting, prepare, args.compile, output_fmt=args.output_fmt,
                                    dtype=dtype, skip=frozenset(args.skip), levers=tuple(args.levers))
            by_name = {method.name: method for method in methods}
            extractor = by_name["fxfeat"].fn
            classifier = None
            if setting.mode == "pooled":
                import fxfeat

                classifier = fxfeat.inspect(model).head.classifier_module
            reference_fn = _reference(by_name["eager"].fn, setting, extractor.feature_info.module_name(), classifier)
            for batch in args.batch_sizes:
                progress.set_description(f"{spec} {setting.label} b{batch}")
                x = torch.randn(batch, *args.input_size, device=device).contiguous(memory_format=memory_format)
                reference = None
                if reference_fn is not None:
                    with torch.no_grad():
                        reference = with_autocast(reference_fn, device, dtype)(x)
                group, timed = [], {}
                for method in methods:
                    row = dict(model=spec, setting=setting.label, batch=batch, method=method.name,
                               build_s=method.build_s, skipped=method.skipped)
                    group.append(row)
                    if method.fn is None:
                        continue
                    fn = with_autocast(method.fn, device, dtype)
                    with torch.no_grad():  # the first call at a shape compiles, or packs oneDNN's weights
                        if method.extra.get("compile_on_first_call") and not method.build_s:
                            if batch > 1:  # one graph for every batch size, as optimize_for_inference compiles
                                torch._dynamo.maybe_mark_dynamic(x, 0)
                            method.build_s = row["build_s"] = check(fn, x, None, dtype).seconds  # its build time
                        else:
                            fn(x)
                    result = check(fn, x, None if method.name == "eager" else reference, dtype)
                    row.update(correct=result.correct, max_error=result.max_error,
                               peak_memory_mb=result.peak_memory_mb, gflops=result.gflops)
                    if result.correct:
                        timed[method.name] = (fn, result.seconds)
                    else:
                        row["skipped"] = f"wrong features (max relative error {result.max_error:.2e}): not timed"
                slowest = max((seconds for _, seconds in timed.values()), default=0.0)
                latencies = interleaved_latencies({name: fn for name, (fn, _) in timed.items()}, x,
                                                  rounds=args.rounds, min_run_time=max(0.3, 3 * slowest))
                for row in group:
                    measured = latencies.get(row["method"])
                    if measured is not None:
                        row.update(latency_ms=measured.median * 1e3, iqr_ms=measured.iqr * 1e3,
                                   runs=measured.runs, throughput=batch / measured.median)
                rows.extend(group)
                progress.update(1)
                if args.out:  # so far: a run stopped by a time limit keeps what it measured
                    _write_json(_results(args, device, settings, rows), args.out)
    progress.close()
    return _results(args, device, settings, rows)


def _results(args: argparse.Namespace, device: torch.device, settings: list[Setting], rows: list[dict]) -> dict:
    """The run's JSON: device, versions, settings, every measurement so far."""
    return dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        device=args.device,
        device_name=device_name(device),
        versions=_versions(),
        settings=dict(models=args.models, batch_sizes=args.batch_sizes, dtype=args.dtype,
                      channels_last=args.channels_last, mode=args.mode,
                      out_indices=[s.out_indices for s in settings], output_stride=args.output_stride,
                      input_size=args.input_size, compile=args.compile, levers=args.levers,
                      output_fmt=args.output_fmt),
        command=" ".join(["python -m benchmarks.run", *sys.argv[1:]]),
        results=rows,
    )


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=quiet, file=sys.stderr)
    except ImportError:  # a progress bar is a convenience, not a dependency
        class _Silent:
            def update(self, n): pass
            def set_description(self, text): pass
            def close(self): pass

        return _Silent()


def _write_json(results: dict, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="torchvision:NAME or timm:NAME")
    parser.add_argument("--mode", default="features", choices=["features", "unpooled", "pooled"])
    parser.add_argument("--out-indices", type=_parse_out_indices, nargs="+", default=[None, (0, 1, 2)],
                        help="'all' or comma-separated indices, one setting each (mode features)")
    parser.add_argument("--output-stride", type=int, choices=[8, 16, 32])
    parser.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224])
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of fxfeat, of optimize_for_inference and of timm")
    parser.add_argument("--skip", nargs="*", default=[], choices=["fxfeat+compile", "fxfeat+optimize+compile",
                                                                   "timm+compile", "timm+compile-weights",
                                                                   "fxfeat+optimize-nchw"],
                        help="methods not to build (each compilation takes a while)")
    parser.add_argument("--levers", nargs="*", default=[], choices=sorted(LEVERS),
                        help="with --compile: also time optimize_for_inference(compile=CompileSettings(...)) with "
                        "these levers (benchmarks.methods.LEVERS)")
    parser.add_argument("--output-fmt", default="native", choices=["native", "NCHW"],
                        help="fxfeat's output_fmt (NCHW: token levels as maps, as timm's features_only returns them)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best one counts")
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--markdown", help="Markdown report")
    parser.add_argument("--plot", help="PNG plot of latency relative to the limit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.mode != "features":
        args.out_indices = [None]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = run(args)
    if args.out:
        _write_json(results, args.out)
    if args.plot:
        write_plot(results, args.plot)
    if args.markdown:
        write_markdown(results, args.markdown, plot=args.plot)
    else:
        print(write_markdown(results, None, plot=None))
    return results


if __name__ == "__main__":
    main()
