"""Command line: ``python -m fxfeat inspect torchvision:resnet50 [--plot levels.svg [--image cat.jpg]]``,
``python -m fxfeat export timm:NAME --onnx out.onnx``, ``python -m fxfeat extract timm:NAME DATA --out DIR``,
``python -m fxfeat models --reduction 8 --max-params 10M`` (the catalog of every model's levels) and
``python -m fxfeat demo``.

Models are named ``torchvision:NAME``, ``timm:NAME``, ``hf:PATH`` (a dual encoder gives its image side),
``open_clip:ARCH[/TAG]`` (the image tower) or ``package.module:factory`` (:mod:`fxfeat.models`). ``inspect``,
``export`` and ``demo`` build them with random weights (no download); ``extract`` loads the library's pretrained
weights unless ``--weights random`` or ``--weights PATH``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fxfeat.errors import FxFeatError
from fxfeat.models import build_model
from fxfeat.plan.plan import format_table
from fxfeat.plan.request import MODES

__all__ = ["build_model", "main"]


_DESCRIPTION = (
    "Compile PyTorch vision models into feature extractors: inspect their levels, export them, extract features "
    "of whole datasets. Models are named torchvision:NAME, timm:NAME, hf:PATH (a dual encoder gives its image "
    "side), open_clip:ARCH[/TAG] (the image tower) or package.module:factory; "
    "inspect, export and demo build them with random weights (no download), extract loads the library's "
    "pretrained weights unless --weights random or --weights PATH."
)
_MODEL_HELP = ("torchvision:NAME, timm:NAME, hf:PATH (a local Hugging Face model directory; a dual encoder such as "
               "CLIP or SigLIP gives its image side), open_clip:ARCH[/TAG] (the image tower, e.g. "
               "open_clip:ViT-B-32/laion2b_s34b_b79k) or package.module:factory")
_EXAMPLES = (
    "examples: python -m fxfeat inspect torchvision:resnet50; python -m fxfeat export timm:resnet50 --onnx "
    "out.onnx; python -m fxfeat extract timm:resnet50 images/ --out features/; python -m fxfeat demo. "
    "'python -m fxfeat COMMAND --help' gives a command's options."
)


def _inspect(args: argparse.Namespace) -> None:
    import fxfeat

    model = build_model(args.model)
    levels = args.levels if args.levels in (None, "auto") else args.levels.split(",")
    input_size, out_indices = tuple(args.input_size) if args.input_size else None, _out_indices(args.out_indices)
    if args.image and not args.plot:
        raise fxfeat.InvalidRequestError("--image draws feature maps in the picture of --plot.",
                                         hint="add --plot FILE.svg or --plot FILE.png.")
    print(fxfeat.inspect(model, levels=levels, input_size=input_size, out_indices=out_indices))
    if args.plot:
        from fxfeat.extraction.preprocess import resolve_preprocessing

        size = input_size or fxfeat.api.make_request(model).input_size
        steps = resolve_preprocessing(model, size, spec=args.model) if args.image else None
        fxfeat.plot(model, args.plot, image=args.image, levels=levels, input_size=input_size,
                    out_indices=out_indices, preprocessing=steps)
        print(f"picture written to {args.plot}")


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


def _models(args: argparse.Namespace) -> None:
    import json

    import fxfeat

    entries = fxfeat.catalog(args.name, library=args.library, reduction=args.reduction, min_levels=args.min_levels,
                             max_params=args.max_params, exports=args.exports, token=True if args.token else None)
    if args.json:
        print(json.dumps(entries, indent=1))
        return
    rows = [(f"{e['library']}:{e['name']}", "-" if e["params"] is None else f"{e['params'] / 1e6:.1f}M",
             " ".join(f"{level['reduction']}:{level['channels']}" for level in e["levels"] or ()) or "-",
             "x".join(map(str, e["pooled"] or ())) or "-", ",".join(e["exports"] or ()) or "-",
             (e["error"] or "")[:60]) for e in entries]
    print(format_table(("model", "params", "levels (reduction:channels)", "pooled", "exports", "error"), rows))
    print(f"{len(entries)} model{'' if len(entries) == 1 else 's'}")


def _out_indices(text: str | None):
    if text is None:
        return None
    values = tuple(int(part) for part in text.split(","))
    return values[0] if len(values) == 1 and not text.endswith(",") else values


def _export(args: argparse.Namespace) -> None:
    import fxfeat
    from fxfeat import export

    targets = [(flag, path) for flag, path in (("onnx", args.onnx), ("torchscript", args.torchscript),
                                                 ("exported_program", args.exported_program)) if path]
    if not targets:
        raise fxfeat.InvalidRequestError("Nothing to export.",
                                         hint="give --onnx PATH, --torchscript PATH or --exported-program PATH.")
    model = build_model(args.model)
    input_size = tuple(args.input_size) if args.input_size else None
    extractor = fxfeat.compile(model, mode=args.mode, out_indices=_out_indices(args.out_indices),
                               output_stride=args.output_stride, input_size=input_size)
    channels, height, width = extractor.input_size
    with torch.no_grad():
        outputs = extractor.eval()(torch.randn(1, channels, height, width))
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    print(f"{args.model}: {len(outputs)} outputs for a 1x{channels}x{height}x{width} input")
    for name, output in zip(export.output_names(extractor), outputs):
        print(f"  {name:<28} {list(output.shape)}")
    for kind, path in targets:
        if kind == "onnx":
            report = export.to_onnx(extractor, path, dynamic=not args.static)
        elif kind == "torchscript":
            _, report = export.to_torchscript(extractor, args.method, path=path, return_report=True)
        else:
            _, report = export.to_exported_program(extractor, path=path, dynamic=not args.static,
                                                   return_report=True)
        print(report)


def _features(text: str) -> list[str | int]:
    return [int(item) if item.lstrip("-").isdigit() else item for item in text.split(",") if item]


def _pool(text: str | None):
    if text is None or "=" not in text:
        return None if text in (None, "none") else text
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {name: None if choice == "none" else choice for name, choice in pairs}


_DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _extract(args: argparse.Namespace) -> None:
    import fxfeat

    summary = fxfeat.extract(
        args.model, args.data, args.out, features=_features(args.features), pool=_pool(args.pool),
        batch_size=args.batch_size, num_workers=args.workers, dtype=_DTYPES[args.dtype],
        compute_dtype=None if args.compute_dtype == "auto" else _DTYPES[args.compute_dtype],
        shard_size=args.shard_size, overwrite=args.overwrite, device=args.device, optimize=not args.no_optimize,
        on_error=args.on_error, out_indices=_out_indices(args.out_indices), weights=args.weights,
        input_size=tuple(args.input_size) if args.input_size else None, output_stride=args.output_stride,
        progress=not args.quiet,
    )
    if int(__import__("os").environ.get("RANK", 0)) == 0:
        print(summary)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fxfeat", description=_DESCRIPTION, epilog=_EXAMPLES)
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the levels fxfeat finds in a model")
    inspect.add_argument("model", help=_MODEL_HELP)
    inspect.add_argument("--levels", default=None, help="'auto', or comma-separated module paths/node names")
    inspect.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    inspect.add_argument("--out-indices", help="the levels returned, e.g. '1,2,3,4', or 'N' for the last N")
    inspect.add_argument("--plot", metavar="FILE", help="draw the levels as one strip into FILE (.svg or .png)")
    inspect.add_argument("--image", metavar="PATH", help="with --plot: each level's feature map on this image "
                         "(3 principal components as RGB), after the model's own preprocessing")
    inspect.set_defaults(run=_inspect)
    export = commands.add_parser("export", help="compile a model and export the extractor, checked against eager")
    export.add_argument("model", help=_MODEL_HELP)
    export.add_argument("--onnx", metavar="PATH", help="write an ONNX file")
    export.add_argument("--torchscript", metavar="PATH", help="write a TorchScript archive")
    export.add_argument("--exported-program", metavar="PATH", help="write a torch.export archive (.pt2)")
    export.add_argument("--method", choices=("script", "trace"), default="script", help="TorchScript method")
    export.add_argument("--mode", choices=MODES, default="features", help="features (the pyramid), unpooled, "
                        "pooled (before the final linear maps), embedding or logits (the model's own final vector)")
    export.add_argument("--out-indices", help="e.g. '1,2,3,4', or 'N' for the last N levels")
    export.add_argument("--output-stride", type=int, choices=(8, 16, 32))
    export.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    export.add_argument("--static", action="store_true", help="fix the batch, height and width to the example's")
    export.set_defaults(run=_export)
    extract = commands.add_parser(
        "extract", help="features of every image of a dataset into DIR (resumable; under torchrun on many GPUs)",
        description="Write features of every image of DATA to DIR: DIR/<feature>/part-NNNNN.npy and "
        "DIR/metadata/part-NNNNN.parquet, with DIR/manifest.json. Rerun the same command to finish an interrupted "
        "run; run it under torchrun to split the parts across processes.")
    extract.add_argument("model", help=_MODEL_HELP)
    extract.add_argument("data", help="an image folder, a .txt/.csv list of paths, or tar shards "
                         "('train-{000..099}.tar')")
    extract.add_argument("--out", required=True, metavar="DIR", help="the output directory")
    extract.add_argument("--features", default="pooled",
                         help="comma-separated: pooled (the vector before the final linear maps), embedding or "
                         "logits (the model's own final vector: a CLIP tower's projected embedding, a classifier's "
                         "logits), unpooled, features (the pyramid), level indices or names")
    extract.add_argument("--out-indices", help="the pyramid levels of 'features', e.g. '1,2,3', or 'N' for the last N")
    extract.add_argument("--pool", help="avg or max: maps become vectors; or per feature: 'layer3=avg,layer4=max'")
    extract.add_argument("--batch-size", type=int, default=64)
    extract.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: this process's "
                         "share of the CPUs, at most 8)")
    extract.add_argument("--dtype", choices=sorted(_DTYPES), default="float16", help="the written features' dtype")
    extract.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                         help="the dtype the extractor computes in; auto: on a GPU the rows' half precision, on the "
                         "CPU for half-precision rows the faster of float32 and bfloat16 in a short timed probe, "
                         "else float32 (a rerun: the dtype the output records)")
    extract.add_argument("--shard-size", type=int, default=10_000, help="images per part")
    extract.add_argument("--overwrite", action="store_true", help="replace an earlier extraction in DIR")
    extract.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: this rank's GPU if any)")
    extract.add_argument("--weights", default="pretrained", help="pretrained (the library's: timm's, "
                         "torchvision's, an open_clip:ARCH/TAG's, an hf:PATH directory's), random, or the path of a "
                         "checkpoint (a whole dual encoder's loads into its image side)")
    extract.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                         help="an unreadable image: record it and go on, or stop")
    extract.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                         help="the size images are preprocessed to and the extractor compiled for (default: the "
                         "size the model's own preprocessing makes)")
    extract.add_argument("--output-stride", type=int, choices=(8, 16, 32))
    extract.add_argument("--no-optimize", action="store_true", help="run the plain extractor "
                         "(not optimize_for_inference)")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(run=_extract)
    models = commands.add_parser(
        "models", help="the catalog of every timm and torchvision model's levels, filtered",
        description="Every timm and torchvision classification model with the levels fxfeat.compile returns by "
        "default, its parameters and head features, from the catalog shipped with fxfeat (docs/catalog.md).")
    models.add_argument("name", nargs="?", help="one model, timm:NAME or torchvision:NAME (compiled now where the "
                        "installed library is of another version than the catalog's)")
    models.add_argument("--library", help="timm or torchvision")
    models.add_argument("--reduction", type=int, help="has a level at this reduction, e.g. 8")
    models.add_argument("--min-levels", type=int, help="at least this many levels")
    models.add_argument("--max-params", help="at most this many parameters: 25000000, 500K, 10M, 1.5G")
    models.add_argument("--exports", action="append", help="exported and checked to this format in the export "
                        "zoo: onnx, torchscript, torchscript-script, torchscript-trace, exported_program "
                        "(repeat for several)")
    models.add_argument("--token", action="store_true", help="only models whose levels include token sequences")
    models.add_argument("--json", action="store_true", help="print the entries as JSON")
    models.set_defaults(run=_models)
    demo = commands.add_parser("demo", help="compile a few models and print their pyramids")
    demo.add_argument("models", nargs="*", default=["torchvision:resnet50", "timm:regnety_032"])
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except FxFeatError as error:
        print(f"fxfeat: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        rerun = " The parts written are kept: rerun the same command to finish." if args.command == "extract" else ""
        print(f"fxfeat: interrupted.{rerun}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main(sys.argv[1:])
