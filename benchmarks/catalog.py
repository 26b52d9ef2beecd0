"""``make catalog``: the catalog of every timm model (``timm.list_models()``) and every torchvision classification
model, shipped in the package as ``fxfeat/zoo/catalog.json.gz`` and read by ``fxfeat.catalog`` and
``python -m fxfeat models``.

Each model's entry is :func:`fxfeat.zoo.entry.catalog_entry`: the model built with random weights on the ``meta``
device (on the CPU where it fails there), compiled with the defaults, its levels, head shapes and parameters
recorded, or the reason it does not compile. Worker processes (one thread each) take one model at a time under a
time limit. The export formats come from the export zoo's report (``docs/export.json``, ``make export-zoo``)
where it measured the model. The build's figures go between the markers of ``docs/catalog.md``.

Usage::

    python -m benchmarks.catalog [--models timm:NAME torchvision:NAME ...] [--sample 40] [--workers 2]
        [--timeout 120] [--out fxfeat/zoo/catalog.json.gz] [--resume | --update] [--render]

``--resume`` keeps the entries of an existing ``--out`` built with the same library versions and compiles only
the models it lacks (a build split over several runs); ``--update --models ...`` compiles the models named again
and keeps every other entry; ``--render`` only rewrites ``docs/catalog.md`` from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["main", "summarise"]

DEFAULT_OUT = Path("fxfeat/zoo/catalog.json.gz")
EXPORTS = Path("docs/export.json")
PAGE = Path("docs/catalog.md")
MARKERS = ("<!-- catalog-build:start -->", "<!-- catalog-build:end -->")
DEFAULT_TIMEOUT_S = 120


def _worker(connection) -> None:
    """Compute the entries of the models sent over ``connection`` until it sends ``None``."""
    from benchmarks.coverage import serve
    from fxfeat.zoo.entry import catalog_entry

    serve(connection, lambda case: catalog_entry(case["library"], case["name"]))


def _cases(args) -> list[dict[str, str]]:
    if args.models:
        from fxfeat.models import split_spec

        return [dict(zip(("library", "name"), split_spec(spec))) for spec in args.models]
    import timm
    import torchvision

    cases = [dict(library="timm", name=name) for name in timm.list_models()]
    torchvision_names = torchvision.models.list_models(module=torchvision.models)
    cases += [dict(library="torchvision", name=name) for name in torchvision_names]
    if args.sample:
        cases = sorted(random.Random(0).sample(cases, args.sample), key=lambda case: (case["library"], case["name"]))
    return cases


def _exports(path: Path) -> tuple[dict[tuple[str, str], list[str]], str | None]:
    """``{(library, name): formats exported and checked}`` from the export zoo's report, and its date."""
    if not path.exists():
        return {}, None
    report = json.loads(path.read_text())
    formats: dict[tuple[str, str], list[str]] = {}
    for result in report["results"]:
        passed = formats.setdefault((result["library"], result["name"]), [])
        if result.get("ok"):
            passed.append(result["format"])
    return {key: sorted(value) for key, value in formats.items()}, report.get("date")


def _complete(case: dict[str, Any]) -> dict[str, Any]:
    """A result the pool made (time limit, dead worker) with every key an entry has."""
    from fxfeat.zoo.entry import HEAD_KEYS

    empty = dict(params=None, levels=None, source=None, token=None, input_size=None, exports=None, device=None)
    return {**empty, **dict.fromkeys(HEAD_KEYS), **case}


def summarise(catalog: dict[str, Any]) -> dict[str, Any]:
    """Counts of the catalog: models with levels per library, by device, the reasons for the CPU fallbacks."""
    entries = catalog["entries"]
    summary: dict[str, Any] = {}
    for library in ("timm", "torchvision"):
        rows = [e for e in entries if e["library"] == library]
        summary[library] = dict(total=len(rows), with_levels=sum(e["levels"] is not None for e in rows))
    summary["devices"] = dict(Counter(e["device"] or "none (time limit)" for e in entries if not e["error"]))
    fallbacks = [e for e in entries if e.get("meta_error") and not e["error"]]
    summary["cpu_fallback_reasons"] = dict(Counter(e["meta_error"].split(":")[0] for e in fallbacks).most_common())
    summary["cpu_fallback_models"] = [e["name"] for e in fallbacks]
    summary["errors"] = dict(Counter(e["error"].split(":")[0] for e in entries if e["error"]).most_common())
    summary["sources"] = dict(Counter(e["source"] for e in entries if e["levels"] is not None))
    summary["seconds_median"] = statistics.median(e["seconds"] for e in entries if e.get("seconds") is not None)
    summary["with_exports"] = sum(e["exports"] is not None for e in entries)
    return summary


def _percent(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.1f}%)" if total else "0/0"


def render(catalog: dict[str, Any], out: Path, page: Path) -> None:
    """The build's figures between the markers of ``page``."""
    summary = summarise(catalog)
    versions = ", ".join(f"{key} {value}" for key, value in catalog["versions"].items())
    lines = [
        f"Built by `make catalog` (`python -m benchmarks.catalog`) on {catalog['machine']}, {catalog['date']}; "
        f"{versions}. {len(catalog['entries'])} models, **{catalog['wall_s'] / 60:.1f} min** wall with "
        f"{catalog['workers']} workers x 1 thread, {catalog['timeout_s']:.0f} s limit per model; "
        f"median {summary['seconds_median']} s per model. Data file `{out.as_posix()}`: "
        f"**{out.stat().st_size / 1024:.0f} KiB** (gzip-compressed JSON).",
        "",
        "| measure | result |",
        "|---|---|",
        f"| timm models with levels | {_percent(summary['timm']['with_levels'], summary['timm']['total'])} |",
        f"| torchvision models with levels | "
        f"{_percent(summary['torchvision']['with_levels'], summary['torchvision']['total'])} |",
        "| where the levels come from | " + ", ".join(f"{k}: {v}" for k, v in summary["sources"].items()) + " |",
        f"| compiled on the meta device / on the CPU | {summary['devices'].get('meta', 0)} / "
        f"{summary['devices'].get('cpu', 0)} |",
        "| why the CPU was needed | " + (", ".join(f"{k}: {v}" for k, v in summary["cpu_fallback_reasons"].items())
                                        or "-") + " |",
        "| why models do not compile | " + (", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "-")
        + " |",
        f"| models with export results (export zoo, {catalog.get('exports_date') or 'not found'}) | "
        f"{summary['with_exports']} |",
    ]
    text = page.read_text() if page.exists() else f"{MARKERS[0]}\n{MARKERS[1]}\n"
    head, _, rest = text.partition(MARKERS[0])
    _, _, tail = rest.partition(MARKERS[1])
    page.write_text(f"{head}{MARKERS[0]}\n" + "\n".join(lines) + f"\n{MARKERS[1]}{tail}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="timm:NAME or torchvision:NAME (default: every model)")
    parser.add_argument("--sample", type=int, help="a seeded random sample of this many models")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--page", type=Path, default=PAGE, help="the page whose build figures are rewritten")
    parser.add_argument("--exports", type=Path, default=EXPORTS, help="the export zoo's report")
    parser.add_argument("--resume", action="store_true", help="keep the entries of --out of the same versions")
    parser.add_argument("--update", action="store_true", help="compile the --models again and keep every other "
                        "entry of --out (after a change of the level rule that touches a few models)")
    parser.add_argument("--render", action="store_true", help="only rewrite --page from --out")
    args = parser.parse_args(argv)
    from fxfeat.version import __version__
    from fxfeat.zoo.query import installed_versions, read_catalog, write_catalog

    if args.render:
        catalog = read_catalog(args.out)
        render(catalog, args.out, args.page)
        return catalog
    import torch

    from benchmarks.compile_time import cpu_name
    from benchmarks.coverage import _Pool

    versions = dict(installed_versions(), torch=torch.__version__, fxfeat=__version__)
    cases, kept, previous_s = _cases(args), {}, 0.0
    if (args.resume or args.update) and args.out.exists():
        previous = read_catalog(args.out)
        if previous["versions"] == versions:
            kept = {(e["library"], e["name"]): e for e in previous["entries"]}
            previous_s = previous["wall_s"]
    if args.update:  # the models named are compiled again, every other entry is kept
        todo = cases
        cases = [dict(library=library, name=name) for library, name in kept]
        cases += [case for case in todo if (case["library"], case["name"]) not in kept]
    else:
        todo = [case for case in cases if (case["library"], case["name"]) not in kept]
    print(f"catalog: {len(todo)} models to compile ({len(cases) - len(todo)} kept), {args.workers} workers",
          flush=True)
    start, results = time.monotonic(), []

    def on_result(result):
        results.append(_complete(result))
        if len(results) % 25 == 0 or len(results) == len(todo):
            print(f"  {len(results)}/{len(todo)} in {time.monotonic() - start:.0f} s, last {result['name']}",
                  flush=True)

    pool = _Pool(args.workers, args.timeout, target=_worker)
    try:
        pool.run(todo, on_result)
    finally:
        pool.close()
    exports, exports_date = _exports(args.exports)
    found = kept | {(e["library"], e["name"]): e for e in results}
    entries = [found[(case["library"], case["name"])] for case in cases]
    for entry in entries:
        entry["exports"] = exports.get((entry["library"], entry["name"]))
    catalog = dict(
        versions=versions, machine=f"{cpu_name()}, {platform.system()}", date=datetime.date.today().isoformat(),
        workers=args.workers, timeout_s=args.timeout, wall_s=round(previous_s + time.monotonic() - start, 1),
        exports_date=exports_date, entries=entries,
    )
    write_catalog(catalog, args.out)
    render(catalog, args.out, args.page)
    summary = summarise(catalog)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB, {catalog['wall_s'] / 60:.1f} min)")
    print(json.dumps({key: value for key, value in summary.items() if key != "cpu_fallback_models"}, indent=1))
    return catalog


if __name__ == "__main__":
    main(sys.argv[1:])
