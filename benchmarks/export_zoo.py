"""Which zoo models export to which format: the table of ``docs/export.md``.

The zoo is the one of ``make coverage`` (the models of ``docs/coverage.json``: the smallest model of every timm
family and every torchvision classification model), compiled with the defaults (``fxfeat.compile(model)``, the
feature pyramid). Each model is exported by :mod:`fxfeat.export` to TorchScript (script and trace), ONNX and
``torch.export``; each export runs its own parity check against eager (:func:`fxfeat.export.close`) at
the compile size and, through the dynamic dims, at another batch and size. One worker process per (model,
format) case, two at a time, one thread each, under a time limit.

Usage::

    python -m benchmarks.export_zoo [--models timm:NAME torchvision:NAME ...] [--timeout 150] [--workers 2]
        [--out docs/export.json] [--markdown docs/export-zoo.md] [--guide docs/export.md] [--render]
        [--resume [--retry-timeouts]]

It writes the JSON, the per-model table (``--markdown``) and the summary table between the
``<!-- zoo-table:start -->`` and ``<!-- zoo-table:end -->`` markers of the guide.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["FORMATS", "check_export", "main"]

FORMATS = ("torchscript-script", "torchscript-trace", "onnx", "exported_program")
DEFAULT_TIMEOUT_S = 150


def check_export(library: str, name: str, fmt: str) -> dict[str, Any]:
    """Compile ``library:name`` with the defaults and export it to ``fmt``; failures are recorded, not raised."""
    import fxfeat
    from benchmarks.coverage_check import _build, _input_size, describe_error
    from fxfeat import export

    result: dict[str, Any] = dict(library=library, name=name, format=fmt)
    try:
        model = _build(library, name)
        extractor = fxfeat.compile(model, input_size=_input_size(model))
    except Exception as error:
        return dict(result, compiled=False, error=describe_error(error))
    result["compiled"] = True
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), tempfile.TemporaryDirectory() as directory:
            warnings.simplefilter("ignore")
            if fmt.startswith("torchscript"):
                _, report = export.to_torchscript(extractor, fmt.split("-")[1], return_report=True)
            elif fmt == "onnx":
                report = export.to_onnx(extractor, Path(directory) / "model.onnx")
            else:
                _, report = export.to_exported_program(extractor, return_report=True)
        result.update(ok=True, exporter=report.exporter, dynamic=list(report.dynamic),
                      max_abs_error=max(check.max_abs_error for check in report.checks))
    except Exception as error:
        result.update(ok=False, error=describe_error(error))
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _worker(connection) -> None:
    from benchmarks.coverage import serve

    serve(connection, lambda case: check_export(case["library"], case["name"], case["format"]))


def _cases(args) -> list[dict[str, str]]:
    if args.models:
        models = [tuple(spec.split(":", 1)) for spec in args.models]
    else:
        coverage = json.loads(Path(args.coverage).read_text())
        models = [(result["library"], result["name"]) for result in coverage["results"]]
    return [dict(library=library, name=name, format=fmt) for library, name in models for fmt in FORMATS]


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format: models compiled, exported and checked, with every dim dynamic, and by which exporter."""
    summary: dict[str, Any] = {}
    for fmt in FORMATS:
        # A case past the time limit has no record of compiling; it counts as compiled and not exported.
        rows = [r for r in results if r["format"] == fmt and r.get("compiled", True)]
        exported = [r for r in rows if r.get("ok")]
        summary[fmt] = dict(
            compiled=len(rows), exported=len(exported),
            fully_dynamic=sum(r["dynamic"] == ["batch", "height", "width"] for r in exported),
            batch_only=sum(r["dynamic"] == ["batch"] for r in exported),
            exporters={e: sum(r["exporter"] == e for r in exported) for e in sorted({r["exporter"] for r in exported})},
            timeouts=sum("timeout" in r.get("error", "") for r in rows),
        )
    return summary


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    if not result.get("compiled", True):
        return "not compiled"
    if "timeout" in result.get("error", ""):
        return "time limit"
    if result.get("ok"):
        dims = {"batch,height,width": "dynamic", "batch": "batch only", "": "static"}[",".join(result["dynamic"])]
        return f"yes ({dims})"
    return "**no**"


def summary_table(report: dict[str, Any]) -> list[str]:
    results = report["results"]
    lines = [
        f"Measured on {report['machine']}, {report['date']}; python {report['versions']['python']}, torch "
        f"{report['versions']['torch']}, onnx {report['versions']['onnx']}, onnxruntime "
        f"{report['versions']['onnxruntime']}. {len({(r['library'], r['name']) for r in results})} models, "
        f"{report['wall_s'] / 60:.1f} min wall, {report['timeout_s']:.0f} s limit per model and format. *Exported*: "
        "the export succeeded and its parity check against eager passed (`fxfeat.export.close`: rtol 1e-4, "
        "absolute tolerance 1e-5 + 1e-4 x the output's largest magnitude) at the compile size and through every "
        "dim it reports dynamic.",
        *([f"**Partial: {len(results)} of {report['cases']} (model, format) cases measured so far** (the run was "
           "interrupted; `python -m benchmarks.export_zoo --resume` measures the rest)."]
          if len(results) < report["cases"] else []),
        "",
        "| format | exported / compiled | every dim dynamic | batch only | by exporter | time limit hit |",
        "|---|---|---|---|---|---|",
    ]
    for fmt, s in report["summary"].items():
        share = f"{s['exported']}/{s['compiled']} ({100 * s['exported'] / max(s['compiled'], 1):.1f}%)"
        exporters = ", ".join(f"{e}: {n}" for e, n in s["exporters"].items()) or "-"
        lines.append(f"| {fmt} | {share} | {s['fully_dynamic']} | {s['batch_only']} | {exporters} | "
                     f"{s['timeouts']} |")
    return lines


def write_markdown(report: dict[str, Any], path: Path, guide: Path | None = None) -> None:
    """The per-model table to ``path``; the summary also into ``guide`` between its markers."""
    results = report["results"]
    lines = ["# Export: which zoo models export to which format", "",
             "Generated by `python -m benchmarks.export_zoo`; see [export.md](export.md).", "",
             *summary_table(report), "", "## Per model", "", "| model | " + " | ".join(FORMATS) + " |",
             "|---|" + "---|" * len(FORMATS)]
    by_model: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        by_model.setdefault((r["library"], r["name"]), {})[r["format"]] = r
    for (library, name), row in by_model.items():
        lines.append(f"| {library}:{name} | " + " | ".join(_cell(row.get(fmt)) for fmt in FORMATS) + " |")
    failures = [r for r in results if r.get("compiled", True) and not r.get("ok")]
    if failures:
        lines += ["", "## Why an export failed", ""]
        lines += [f"- {r['library']}:{r['name']} {r['format']}: {r.get('error', '')[:400]}" for r in failures]
    path.write_text("\n".join(lines) + "\n")
    if guide is not None and guide.exists():
        text = guide.read_text()
        start, end = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
        if start in text and end in text:
            before, rest = text.split(start, 1)
            after = rest.split(end, 1)[1]
            guide.write_text(before + start + "\n" + "\n".join(summary_table(report)) + "\n" + end + after)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="timm:NAME or torchvision:NAME (default: the coverage zoo)")
    parser.add_argument("--coverage", default="docs/coverage.json", help="the coverage report naming the zoo")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per model and format")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/export.json"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/export-zoo.md"))
    parser.add_argument("--guide", type=Path, default=Path("docs/export.md"), help="gets the summary table")
    parser.add_argument("--render", action="store_true", help="only rewrite --markdown from the --out JSON")
    parser.add_argument("--resume", action="store_true", help="keep the results in --out, run the other cases")
    parser.add_argument("--retry-timeouts", action="store_true",
                        help="with --resume: run again the cases that timed out (a busy machine's timeouts)")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        report["summary"] = summarise(report["results"])
        write_markdown(report, args.markdown, args.guide)
        return report

    import onnx
    import onnxruntime
    import torch

    from benchmarks.compile_time import cpu_name
    from benchmarks.coverage import _Pool

    cases = _cases(args)
    start = time.monotonic()
    results: list[dict[str, Any]] = []
    if args.resume and args.out.exists():  # go on from an interrupted run: its cases are not run again
        previous = json.loads(args.out.read_text())
        results = previous["results"]
        start -= previous["wall_s"]
        if args.retry_timeouts:
            results = [r for r in results if "timeout" not in r.get("error", "")]
        done = {(r["library"], r["name"], r["format"]) for r in results}
        cases_to_run = [c for c in cases if (c["library"], c["name"], c["format"]) not in done]
    else:
        cases_to_run = cases

    def report_now() -> dict[str, Any]:
        return dict(
            machine=f"{cpu_name()}, {args.workers} workers x 1 thread, {platform.system()}",
            date=datetime.date.today().isoformat(),
            versions=dict(python=platform.python_version(), torch=torch.__version__, onnx=onnx.__version__,
                          onnxruntime=onnxruntime.__version__),
            timeout_s=args.timeout, wall_s=round(time.monotonic() - start, 1), cases=len(cases),
            summary=summarise(results), results=results,
        )

    def on_result(result):
        results.append(result)
        args.out.write_text(json.dumps(report_now(), indent=1) + "\n")  # partial results survive an interruption
        print(f"[{len(results)}/{len(cases)}] {result['library']}:{result['name']} {result['format']}: "
              f"{'ok' if result.get('ok') else result.get('error', '')[:120]}", flush=True)

    pool = _Pool(args.workers, args.timeout, target=_worker)
    try:
        pool.run(cases_to_run, on_result)
    finally:
        pool.close()
    order = {(c["library"], c["name"], c["format"]): i for i, c in enumerate(cases)}
    results = [r for r in results if (r["library"], r["name"], r["format"]) in order]
    results.sort(key=lambda r: order[(r["library"], r["name"], r["format"])])
    report = report_now()
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.markdown, args.guide)
    for fmt, s in report["summary"].items():
        print(f"  {fmt:<20} {s['exported']}/{s['compiled']} exported, {s['fully_dynamic']} fully dynamic")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
