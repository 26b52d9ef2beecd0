"""Token extractors on a GPU: equality with timm's ``forward_intermediates`` (fp32) and latency against it (bf16).

For each ViT-style model, the last three blocks are extracted by fxfeat (``levels="auto"``) and by timm's own
``forward_intermediates(indices=3, output_fmt="NCHW", intermediates_only=True)``, with the same weights. The
fp32 outputs are compared with ``torch.equal`` (and the largest difference is recorded), then both are timed
side by side under bf16 autocast at each batch size (median of CUDA-event timings after warm-up).

Usage (from the repository root, on a machine with a CUDA GPU)::

    PYTHONPATH=. python -m benchmarks.tokens_gpu --out docs/tokens-gpu.json --markdown docs/tokens-gpu.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

import fxfeat

MODELS = ["vit_base_patch16_224", "deit_base_distilled_patch16_224", "eva02_small_patch14_224",
          "vit_small_patch14_reg4_dinov2", "beit_base_patch16_224", "xcit_small_12_p16_224"]


def _time(fn, x: torch.Tensor, repeats: int = 30) -> float:
    """Median milliseconds of ``fn(x)`` over ``repeats`` runs, after warm-up."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(name: str, batch_sizes: list[int]) -> dict:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = fxfeat.compile(model, levels="auto").eval()  # the last three blocks by default, as timm
    indices = list(extractor.feature_info.out_indices)
    model, extractor = model.cuda(), extractor.cuda()

    def timm_blocks(x):
        return model.forward_intermediates(x, indices=indices, output_fmt="NCHW", intermediates_only=True)

    x = torch.randn(2, *size, device="cuda")
    with torch.no_grad():
        ours, theirs = extractor(x), timm_blocks(x)
    record = dict(model=name, blocks=indices, shapes=[list(o.shape) for o in ours],
                  equal=all(torch.equal(a, b) for a, b in zip(ours, theirs)),
                  max_abs_diff=max(float((a - b).abs().max()) for a, b in zip(ours, theirs)), timings=[])
    for batch in batch_sizes:
        x = torch.randn(batch, *size, device="cuda")
        record["timings"].append(dict(batch=batch, timm_ms=round(_time(timm_blocks, x), 3),
                                      fxfeat_ms=round(_time(extractor, x), 3)))
    return record


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 32])
    parser.add_argument("--out", type=Path, default=Path("docs/tokens-gpu.json"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/tokens-gpu.md"))
    args = parser.parse_args(argv)
    results = []
    for name in args.models:
        try:
            results.append(check(name, args.batch_sizes))
        except Exception as error:  # recorded, so one model cannot hide the others
            results.append(dict(model=name, error=f"{type(error).__name__}: {error}"))
        print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name()
    args.out.write_text(json.dumps(dict(device=device, torch=torch.__version__, results=results), indent=1) + "\n")
    lines = [f"# Token extractors on {device}", "",
             f"torch {torch.__version__}; fp32 equality with timm's `forward_intermediates` (last three blocks, "
             "`output_fmt=\"NCHW\"`), then bf16 autocast latency, median of 30 CUDA-event timings "
             "(`python -m benchmarks.tokens_gpu`).", "",
             "| model | blocks | equal (fp32) | max abs diff | batch | timm ms | fxfeat ms |", "|" + "---|" * 7]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | - | error: {r['error']} | - | - | - | - |")
            continue
        for t in r["timings"]:
            lines.append(f"| {r['model']} | {r['blocks']} | {r['equal']} | {r['max_abs_diff']:.2e} | {t['batch']} | "
                         f"{t['timm_ms']} | {t['fxfeat_ms']} |")
    args.markdown.write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
