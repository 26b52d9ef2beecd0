"""Measurements of one method: correctness against eager, peak memory, latency and throughput."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from benchmarks.references import as_list, same_layout

# Relative tolerance of the correctness check (allclose with atol = tolerance * max |reference|).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` on ``device`` (nothing for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class Check:
    """Result of running a method once against the eager reference."""

    correct: bool
    max_error: float
    peak_memory_mb: float
    seconds: float
    gflops: float | None = None


def peak_memory_and_outputs(fn, x: torch.Tensor) -> tuple[float, list[torch.Tensor], float, float | None]:
    """Run ``fn(x)`` once; its extra memory at peak (MB), its outputs, its duration and its GFLOPs.

    On CUDA the peak is ``max_memory_allocated`` above what was allocated before (no FLOP count). On the CPU
    it is replayed from the profiler's allocation events (allocations minus frees, at their highest), and the
    profiler counts the FLOPs of convolutions and matrix products: the work done, free of timing noise.
    """
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        outputs = as_list(fn(x))
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return (torch.cuda.max_memory_allocated() - before) / 2**20, outputs, seconds, None
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_flops=True) as profiler:
        outputs = as_list(fn(x))
    seconds = time.perf_counter() - start
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    gflops = sum(event.flops for event in profiler.events() if event.flops) / 1e9
    return peak / 2**20, outputs, seconds, gflops


def check(fn, x: torch.Tensor, reference: list[torch.Tensor] | None, dtype: torch.dtype) -> Check:
    """Run once: compare with the reference features (``None``: nothing to compare) and measure memory."""
    with torch.no_grad():
        peak, outputs, seconds, gflops = peak_memory_and_outputs(fn, x)
    if reference is None:
        return Check(True, 0.0, peak, seconds, gflops)
    if len(outputs) != len(reference):
        return Check(False, float("inf"), peak, seconds, gflops)
    tolerance, worst, correct = TOLERANCE[dtype], 0.0, True
    for output, expected in zip(outputs, reference):
        expected = same_layout(expected, output)  # a ViT's blocks: tokens in the reference, maps from timm
        if output.shape != expected.shape:
            return Check(False, float("inf"), peak, seconds, gflops)
        output, expected = output.float(), expected.float()
        scale = expected.abs().max().item() or 1.0
        worst = max(worst, (output - expected).abs().max().item() / scale)
        correct = correct and torch.allclose(output, expected, rtol=tolerance, atol=tolerance * scale)
    return Check(correct, worst, peak, seconds, gflops)



def with_autocast(fn, device: torch.device, dtype: torch.dtype):
    """``fn`` running under autocast to ``dtype`` (``fn`` itself for fp32)."""
    if dtype == torch.float32:
        return fn

    def run(x):
        with autocast(device, dtype):
            return fn(x)

    return run
