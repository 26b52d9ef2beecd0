"""The pictures of docs/coverage.md's misses: every timm model of the coverage report whose automatic levels are not
timm's (and that compiles) drawn by ``fxfeat.plot`` with ``levels="auto"``, the levels the report compares, into
``docs/pictures/coverage/NAME.svg``; then docs/coverage.md is rendered again, linking each miss to its picture.

The models are built on the ``meta`` device (no weights: the pictures show shapes, channels and parameter counts,
never values), so the pictures take seconds each, not the coverage run's hour.

Usage: ``python -m benchmarks.coverage_pictures [--report docs/coverage.json] [--out docs/pictures/coverage]``
(``make coverage`` runs it after the coverage benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["PICTURES", "main", "misses", "picture_path"]

PICTURES = Path("pictures/coverage")  # relative to the folder of the report's markdown


def misses(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The timm models of ``report`` whose automatic levels differ from timm's, among those that compile."""
    return [r for r in report["results"] if r["library"] == "timm" and "levels" in r.get("auto", {})
            and not r["auto"].get("identical")]


def picture_path(markdown: Path, name: str) -> Path:
    """Where the picture of model ``name`` lies beside the markdown report ``markdown``."""
    return markdown.parent / PICTURES / f"{name}.svg"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("docs/coverage.json"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/coverage.md"))
    args = parser.parse_args(argv)
    import torch

    import fxfeat
    from benchmarks.coverage import main as coverage
    from fxfeat.models import build_model

    report = json.loads(args.report.read_text())
    folder = args.markdown.parent / PICTURES
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {picture_path(args.markdown, r["name"]) for r in misses(report)}
    for stale in set(folder.glob("*.svg")) - wanted:  # a model that no longer misses
        stale.unlink()
    for result in misses(report):
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build_model(f"timm:{result['name']}")
            fxfeat.plot(model, picture_path(args.markdown, result["name"]), levels="auto")
        print(f"{picture_path(args.markdown, result['name'])} in {time.perf_counter() - start:.1f} s", flush=True)
    coverage(["--render", "--out", str(args.report), "--markdown", str(args.markdown)])


if __name__ == "__main__":
    main(sys.argv[1:])
