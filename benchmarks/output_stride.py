"""Latency of fxfeat's ``output_stride`` extractors against timm's own ``output_stride`` feature models.

Both run the same weights (timm's model gets the fxfeat model's state dict) and their outputs are checked
equal before timing. Usage: ``python -m benchmarks.output_stride [--models ...] [--output-stride 8]``.
"""

from __future__ import annotations

import argparse
import json
import warnings

import timm
import torch

import fxfeat
from benchmarks.compile_time import cpu_name
from benchmarks.references import timm_feature_model
from benchmarks.timing import interleaved_latencies

DEFAULT_MODELS = ["resnet50", "ecaresnet101d", "efficientnet_b0", "regnety_032", "convnext_tiny"]


def measure(name: str, output_stride: int, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = fxfeat.compile(model, output_stride=output_stride).eval()
    reference = timm_feature_model(name, model, output_stride=output_stride)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        same = all(torch.equal(a, b) for a, b in zip(extractor(x), reference(x)))
    if not same:
        raise SystemExit(f"{name}: fxfeat and timm disagree; refusing to time a wrong answer")
    timings = interleaved_latencies({"fxfeat": extractor, "timm": reference}, x)
    return dict(model=name, output_stride=output_stride, batch=batch, size=size,
                fxfeat_ms=timings["fxfeat"].median * 1e3, timm_ms=timings["timm"].median * 1e3,
                fxfeat_iqr_ms=timings["fxfeat"].iqr * 1e3, timm_iqr_ms=timings["timm"].iqr * 1e3,
                ratio=timings["fxfeat"].median / timings["timm"].median)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name, args.output_stride, args.batch, args.size) for name in args.models]
    print(f"Forward latency, output_stride={args.output_stride}, batch {args.batch}, {args.size}x{args.size}, "
          f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, timm {timm.__version__}")
    print(f"{'model':<16}{'fxfeat':>14}{'timm':>14}{'fxfeat/timm':>13}")
    for row in rows:
        print(f"{row['model']:<16}{row['fxfeat_ms']:>8.1f} ±{row['fxfeat_iqr_ms']:>4.1f}ms"
              f"{row['timm_ms']:>8.1f} ±{row['timm_iqr_ms']:>4.1f}ms{row['ratio']:>12.3f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(device=f"cpu: {cpu_name()}", threads=torch.get_num_threads(), torch=torch.__version__,
                           timm=timm.__version__, results=rows), handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
