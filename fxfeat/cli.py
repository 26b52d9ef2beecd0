"""Command line: ``python -m fxfeat inspect torchvision:resnet50`` and ``python -m fxfeat demo``.

Models are named ``torchvision:NAME`` or ``timm:NAME`` and built with random weights (no download).
"""

from __future__ import annotations

import argparse
import difflib
import sys

import torch
from torch import nn

from fxfeat.errors import FxFeatError, InvalidModelError

__all__ = ["build_model", "main"]


def build_model(spec: str, seed: int = 0) -> nn.Module:
    """Build ``torchvision:NAME`` or ``timm:NAME`` with random weights, in eval mode.

    Example:
        >>> build_model("torchvision:resnet18").training  # random weights, eval mode
        False
    """
    library, _, name = spec.partition(":")
    if not name:
        library, name = "torchvision", library
    if library not in ("torchvision", "timm"):
        raise InvalidModelError(f"Unknown model library {library!r} in {spec!r}.",
                                hint="write torchvision:NAME or timm:NAME.")
    if library == "torchvision":
        import torchvision

        known, build = torchvision.models.list_models(), lambda: torchvision.models.get_model(name, weights=None)
    else:
        import timm

        known, build = timm.list_models(), lambda: timm.create_model(name, pretrained=False)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        raise InvalidModelError(
            f"{library} has no model named {name!r}." + (f" Close names: {', '.join(close)}." if close else ""),
            hint=f"list the names with {library}.{'list_models' if library == 'timm' else 'models.list_models'}().",
        )
    torch.manual_seed(seed)
    return build().eval()


def _inspect(args: argparse.Namespace) -> None:
    import fxfeat

    model = build_model(args.model)
    levels = args.levels if args.levels in (None, "auto") else args.levels.split(",")
    print(fxfeat.inspect(model, levels=levels, input_size=tuple(args.input_size) if args.input_size else None))


def _demo(args: argparse.Namespace) -> None:
    import fxfeat

    for spec in args.models:
        model = build_model(spec)
        print(fxfeat.inspect(model))
        extractor = fxfeat.compile(model).eval()
        channels, height, width = fxfeat.api.make_request(model).input_size
        with torch.no_grad():
            features = extractor(torch.randn(2, channels, height, width))
        print(f"  {spec} -> {len(features)} outputs for a batch of 2 at {height}x{width}:")
        for info, feature in zip(extractor.feature_info.get_dicts(), features):
            print(f"    {info['module']:<24} {list(feature.shape)}")
        print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fxfeat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the levels fxfeat finds in a model")
    inspect.add_argument("model", help="torchvision:NAME or timm:NAME")
    inspect.add_argument("--levels", default=None, help="'auto', or comma-separated module paths/node names")
    inspect.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    inspect.set_defaults(run=_inspect)
    demo = commands.add_parser("demo", help="compile a few models and print their pyramids")
    demo.add_argument("models", nargs="*", default=["torchvision:resnet50", "timm:regnety_032"])
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except FxFeatError as error:
        print(f"fxfeat: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main(sys.argv[1:])
