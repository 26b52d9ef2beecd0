"""Latency measurement shared by the benchmarks: ``torch.utils.benchmark``, median and IQR, CUDA-synchronised."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import benchmark


@dataclass(frozen=True)
class Latency:
    """Forward latency of one callable, in seconds."""

    median: float
    iqr: float
    runs: int


def measure_latency(fn, x: torch.Tensor, min_run_time: float = 1.0) -> Latency:
    """Median and IQR of ``fn(x)`` under ``torch.no_grad()``; ``torch.utils.benchmark`` synchronises CUDA."""
    timer = benchmark.Timer(
        stmt="fn(x)",
        setup="torch.set_grad_enabled(False)",
        globals={"fn": fn, "x": x, "torch": torch},
        num_threads=torch.get_num_threads(),
    )
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    return Latency(measurement.median, measurement.iqr, len(measurement.times))


def interleaved_latencies(methods: dict, x: torch.Tensor, rounds: int = 5, min_run_time: float = 1.0) -> dict:
    """Time every method ``rounds`` times, interleaved so that machine noise hits them alike; keep each
    method's best round (lowest median)."""
    best: dict[str, Latency] = {}
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            fn(x)
        for _ in range(rounds):
            for label, fn in methods.items():
                latency = measure_latency(fn, x, min_run_time)
                if label not in best or latency.median < best[label].median:
                    best[label] = latency
    return best
