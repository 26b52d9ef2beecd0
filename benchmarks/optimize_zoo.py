"""``fxfeat.optimize_for_inference`` over the coverage zoo: every model that compiles is optimised and its outputs
compared with the extractor's (float32, eval, batch 2 at the model's input size, allclose at rtol 1e-4 with
atol 1e-4 x max |reference|), the models of ``make coverage``: the smallest of every timm family and every
torchvision classification model. Where the two differ, the same passes run in float64 tell a wrong rewrite
from float32 rounding that the model amplifies (random weights can): if the float64 rewrite agrees with the
float64 extractor to 1e-9, the difference is rounding. Both float32 modules' distances to float64 are recorded
too. Writes JSON and a Markdown summary.

Usage::

    python -m benchmarks.optimize_zoo --out docs/optimize-zoo.json --markdown docs/optimize-zoo.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import signal
import time
import warnings

import torch

import fxfeat
from benchmarks.coverage import timm_families
from benchmarks.references import as_list


class _TimedOut(Exception):
    pass


def _alarm(signum, frame):
    raise _TimedOut


def check_model(spec: str) -> dict:
    """Compile ``spec`` (``timm:NAME`` / ``torchvision:NAME``) with the defaults, optimise it, compare outputs."""
    from fxfeat.models import build_model

    torch.manual_seed(0)
    record: dict = dict(model=spec)
    try:
        extractor = fxfeat.compile(build_model(spec).eval()).eval()
    except Exception as error:  # a model fxfeat does not compile is make coverage's business, not this report's
        record.update(status="does not compile", error=f"{type(error).__name__}: {str(error)[:120]}")
        return record
    started = time.perf_counter()
    try:
        fast = fxfeat.optimize_for_inference(extractor)
        record["optimize_s"] = round(time.perf_counter() - started, 3)
        x = torch.randn(2, *extractor.input_size)
        with torch.no_grad():
            expected = as_list(extractor(x))
        actual = as_list(fast(x))
    except Exception as error:
        record.update(status="failed", error=f"{type(error).__name__}: {str(error)[:200]}")
        return record
    worst, close = 0.0, len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if a.shape != e.shape:
            close, worst = False, float("inf")
            break
        scale = e.abs().max().item() or 1.0
        worst = max(worst, (a - e).abs().max().item() / scale)
        close = close and torch.allclose(a, e, rtol=1e-4, atol=1e-4 * scale)
    record.update(status="allclose" if close else "differs", max_relative_error=worst,
                  optimizations={k: v for k, v in fast.optimizations.items() if k != "build_s"})
    if not close:  # the rewrite, or float32 itself? The same passes in float64 must agree to rounding
        reference64 = copy.deepcopy(extractor).double()
        with torch.no_grad():
            truth = as_list(reference64(x.double()))
        rewritten64 = as_list(fxfeat.optimize_for_inference(reference64)(x.double()))
        record["extractor_error_fp64"], record["optimized_error_fp64"], record["rewrite_error_fp64"] = (
            max(((o.double() - t).abs().max() / t.abs().max()).item() for o, t in zip(outputs, truth))
            for outputs in (expected, actual, rewritten64))
        if record["rewrite_error_fp64"] < 1e-9:
            record["status"] = "float32 rounding (exact in float64)"
    return record


def _note(row: dict) -> str:
    if "optimized_error_fp64" in row:
        return (f"against float64: extractor {row['extractor_error_fp64']:.1e}, optimised "
                f"{row['optimized_error_fp64']:.1e}; the rewrite in float64 {row['rewrite_error_fp64']:.1e}")
    return row.get("error", "")


def _markdown(results: dict) -> str:
    rows = results["results"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    compiled = [row for row in rows if row["status"] != "does not compile"]
    errors = sorted(row["max_relative_error"] for row in compiled if "max_relative_error" in row)
    lines = [
        "# optimize_for_inference over the coverage zoo",
        "",
        f"Measured {results['date']} on {results['device']}; torch {results['torch']}. Command: "
        f"`{results['command']}`.",
        "",
        f"Of {len(compiled)} models that compile: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                                                                if k != "does not compile") + ".",
        f"Median max relative error {errors[len(errors) // 2]:.1e}, largest {errors[-1]:.1e}." if errors else "",
        "",
        "| model | status | max relative error | optimize s | folded | in place | fused sums | oneDNN layers "
        "| channels-last | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in compiled:
        done = row.get("optimizations", {})
        error = row.get("max_relative_error")
        lines.append(
            f"| {row['model']} | {row['status']} | {'-' if error is None else f'{error:.1e}'} | "
            f"{row.get('optimize_s', '-')} | {done.get('fold_batch_norms', '-')} | {done.get('restore_in_place', '-')} "
            f"| {done.get('fuse_residual_sums', '-')} | {done.get('use_onednn', '-')} "
            f"| {done.get('channels_last', '-')} | {_note(row)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="timm:NAME / torchvision:NAME (default: the coverage zoo)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per model")
    parser.add_argument("--update", action="store_true", help="replace the given models' records in --out")
    parser.add_argument("--out")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    specs = args.models
    records: dict[str, dict] = {}  # by model, in order
    if args.update and args.out:  # check the given models again, keep the other records
        with open(args.out) as handle:
            records = {row["model"]: row for row in json.load(handle)["results"]}
    if not specs:
        import torchvision

        specs = [f"timm:{family['model']}" for family in timm_families().values()]
        specs += [f"torchvision:{name}" for name in torchvision.models.list_models(module=torchvision.models)]
    from benchmarks.compile_time import cpu_name

    command = "python -m benchmarks.optimize_zoo" + (f" --update --models {' '.join(specs)}" if args.update else "")
    results = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                   device=f"{cpu_name()} ({torch.get_num_threads()} threads)", torch=torch.__version__,
                   command=command, results=[])
    signal.signal(signal.SIGALRM, _alarm)
    for spec in specs:
        signal.alarm(args.timeout)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record = check_model(spec)
        except _TimedOut:
            record = dict(model=spec, status="timed out", error=f"over {args.timeout} s")
        finally:
            signal.alarm(0)
        records[spec] = record
        results["results"] = list(records.values())
        print(spec, record["status"], record.get("max_relative_error", record.get("error", "")), flush=True)
        if args.out:
            with open(args.out, "w") as handle:
                json.dump(results, handle, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(_markdown(results))
    return results


if __name__ == "__main__":
    main()
