"""Latency measurement shared by the benchmarks: ``torch.utils.benchmark``, median and IQR, CUDA-synchronised."""

from __future__ import annotations

import statistics
import time
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


def paired_latency_ratio(fn, reference, x: torch.Tensor, pairs: int = 40) -> float:
    """Median over ``pairs`` back-to-back calls of ``fn(x)`` time / ``reference(x)`` time, under ``torch.no_grad()``
    (CPU callables: nothing synchronises CUDA).

    Each pair runs the two calls next to each other (alternating which goes first), so a slow spell of a shared
    machine hits both calls of a pair alike; the median ignores the pairs it split. Steadier than comparing two
    separately timed blocks when the question is "is ``fn`` slower than ``reference``", as in a test.
    """
    ratios = []
    with torch.no_grad():
        fn(x), reference(x)  # warm-up
        for index in range(pairs):
            order = (fn, reference) if index % 2 == 0 else (reference, fn)
            seconds = {}
            for call in order:
                start = time.perf_counter()
                call(x)
                seconds[call] = time.perf_counter() - start
            ratios.append(seconds[fn] / seconds[reference])
    return statistics.median(ratios)
