"""Reports of a harness run: a Markdown table per model, a target summary, and a PNG plot."""

from __future__ import annotations

from collections import defaultdict

METHODS = ["eager", "limit", "timm", "torchvision", "fxfeat", "fxfeat+compile", "fxfeat+optimize",
           "fxfeat+optimize-nchw", "timm+compile", "timm+compile-weights", "fxfeat+optimize+compile"]
COLORS = {"limit": "tab:grey", "timm": "tab:orange", "torchvision": "tab:blue", "fxfeat": "tab:green",
          "fxfeat+compile": "tab:olive", "fxfeat+optimize": "tab:red", "timm+compile": "tab:brown",
          "timm+compile-weights": "tab:cyan", "fxfeat+optimize-nchw": "tab:pink",
          "fxfeat+optimize+compile": "tab:purple"}
# Issue 13's targets: optimize_for_inference against timm's features_only (CPU: median speed-up >= 1.2, each
# >= 1.1). Issue 22's, on the GPU: the compiled extractor against the faster of timm + torch.compile under autocast
# and with converted weights, at least 1.10x at batch 32 and 128 and 1.15x in median there, no slower at batch 1,
# and a first call (compilation) at most 1.2x the peer's.
OPTIMIZE_MEDIAN, OPTIMIZE_EACH = 1.2, 1.1
COMPILED_BATCHES, COMPILED_SPEEDUP, COMPILED_MEDIAN, COMPILE_TIME = (32, 128), 1.1, 1.15, 1.2
PEERS = ("timm+compile", "timm+compile-weights")


def _methods(results: dict) -> list[str]:
    """The methods of a run in report order: :data:`METHODS`, then others (compile levers) as they appear."""
    seen = list(dict.fromkeys(row["method"] for row in results["results"]))
    return [m for m in METHODS if m in seen] + [m for m in seen if m not in METHODS]


def _compiled_fxfeat(methods: list[str]) -> list[str]:
    return [m for m in methods if m.startswith("fxfeat+optimize+compile")]


def _groups(results: dict) -> dict:
    """Rows by (model, setting, batch), then by method."""
    groups: dict = defaultdict(dict)
    for row in results["results"]:
        groups[(row["model"], row["setting"], row["batch"])][row["method"]] = row
    return groups


def _ratio(rows: dict, method: str, baseline: str) -> float | None:
    a, b = rows.get(method, {}).get("latency_ms"), rows.get(baseline, {}).get("latency_ms")
    return a / b if a and b else None


def _format(value, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def targets(results: dict) -> list[str]:
    """One line per target and configuration where fxfeat was measured against it."""
    lines = []
    for (model, setting, batch), rows in _groups(results).items():
        checks = [("limit", 1.02, "within 2% of the limit"), ("timm", 1.0, "no slower than timm"),
                  ("torchvision", 1.0, "no slower than torchvision")]
        parts = []
        for baseline, bound, text in checks:
            ratio = _ratio(rows, "fxfeat", baseline)
            if ratio is not None:
                parts.append(f"{text}: {ratio:.3f} ({'met' if ratio <= bound else 'missed'})")
        build_fx, build_tv = rows.get("fxfeat", {}).get("build_s"), rows.get("torchvision", {}).get("build_s")
        if build_fx and build_tv:
            ratio = build_fx / build_tv
            parts.append(f"build no slower than torchvision: {ratio:.2f} ({'met' if ratio <= 1 else 'missed'})")
        ratio = _ratio(rows, "timm", "fxfeat+optimize")
        if ratio is not None:
            parts.append(f"fxfeat+optimize speed-up over timm: {ratio:.2f}x "
                         f"({'met' if ratio >= OPTIMIZE_EACH else 'missed'}, target {OPTIMIZE_EACH}x)")
        peer = _faster_peer(rows)
        for method in _compiled_fxfeat(list(rows)) if peer else ():
            ratio, bound = _ratio(rows, peer, method), COMPILED_SPEEDUP if batch in COMPILED_BATCHES else 1.0
            if ratio is not None:
                parts.append(f"{method} over {peer}: {ratio:.2f}x ({'met' if ratio >= bound else 'missed'}, target "
                             f"{bound}x)")
        lines.append(f"- {model}, {setting}, batch {batch}: " + "; ".join(parts))
    speedups = sorted(ratio for rows in _groups(results).values()
                      if (ratio := _ratio(rows, "timm", "fxfeat+optimize")) is not None)
    if speedups:
        median = _median(speedups)
        lines.append(f"- fxfeat+optimize over timm, all {len(speedups)} configurations: median {median:.2f}x "
                     f"({'met' if median >= OPTIMIZE_MEDIAN else 'missed'}, target {OPTIMIZE_MEDIAN}x), lowest "
                     f"{speedups[0]:.2f}x ({'met' if speedups[0] >= OPTIMIZE_EACH else 'missed'}, target "
                     f"{OPTIMIZE_EACH}x)")
    return lines + compiled_goal(results)


def _median(values: list[float]) -> float:
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def _faster_peer(rows: dict) -> str | None:
    """The compiled peer with the lower latency in ``rows`` (``None``: neither was timed)."""
    timed = [peer for peer in PEERS if rows.get(peer, {}).get("latency_ms")]
    return min(timed, key=lambda peer: rows[peer]["latency_ms"]) if timed else None


def compiled_goal(results: dict) -> list[str]:
    """Issue 22's goal, per compiled fxfeat method: its speed-up over the faster compiled peer at batch 32 and 128
    (each and median), at batch 1, and its first-call (compile) time against that peer's."""
    lines = []
    groups = _groups(results)
    for method in _compiled_fxfeat(_methods(results)):
        large, small, build = [], [], []
        for (_, _, batch), rows in groups.items():
            peer = _faster_peer(rows)
            ratio = _ratio(rows, peer, method) if peer else None
            if ratio is None:
                continue
            (large if batch in COMPILED_BATCHES else small if batch == 1 else []).append(ratio)
            ours, theirs = rows[method].get("build_s"), rows[peer].get("build_s")
            if ours and theirs:
                build.append(ours / theirs)
        if not large and not small:
            continue
        parts = []
        if large:
            lowest = "met" if min(large) >= COMPILED_SPEEDUP else "missed"
            parts.append(f"batch 32/128: lowest {min(large):.2f}x ({lowest}, target {COMPILED_SPEEDUP}x), median "
                         f"{_median(large):.2f}x "
                         f"({'met' if _median(large) >= COMPILED_MEDIAN else 'missed'}, target {COMPILED_MEDIAN}x) "
                         f"over {len(large)} configurations")
        if small:
            parts.append(f"batch 1: lowest {min(small):.2f}x ({'met' if min(small) >= 1.0 else 'missed'}, "
                         "target no slower)")
        if build:
            parts.append(f"first call: at most {max(build):.2f}x the peer's "
                         f"({'met' if max(build) <= COMPILE_TIME else 'missed'}, target {COMPILE_TIME}x)")
        lines.append(f"- GPU goal, {method} over the faster compiled peer: " + "; ".join(parts))
    return lines


def write_markdown(results: dict, path: str | None, plot: str | None) -> str:
    """The report as Markdown; written to ``path`` when given. Returns the text."""
    settings = results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        "# Benchmarks: fxfeat vs timm vs torchvision vs the limit",
        "",
        f"Measured {results['date']} on **{results['device_name']}** ({results['device']}); {versions}.",
        f"Settings: dtype {settings['dtype']}, channels-last {settings['channels_last']}, "
        f"input {settings['input_size']}, mode {settings['mode']}, output_stride {settings['output_stride']}, "
        f"torch.compile {'timed' if settings['compile'] else 'not timed'}.",
        f"Command: `{results['command']}`",
        "",
        "Latency is the median of `torch.utils.benchmark` runs (IQR beside it); *vs limit* divides by the latency "
        "of the eager model stopped right after the last requested feature. Every method's features were checked "
        "against the eager model's (allclose) before it was timed; peak memory is the extra memory of one "
        "forward; GFLOP counts the convolutions and matrix products one forward runs (CPU profiler), the work "
        "done, free of timing noise (oneDNN's fused operators, which `fxfeat+optimize` calls on the CPU, are not "
        "counted: its GFLOP column is not its work). `eager` is the whole classifier.",
        "",
    ]
    if plot:
        lines += [f"![latency relative to the limit]({plot.rsplit('/', 1)[-1]})", ""]
    lines += ["## Targets", "", *targets(results), ""]
    by_model = defaultdict(list)
    for key, rows in _groups(results).items():
        by_model[key[0]].append((key, rows))
    header = ("| setting | batch | method | latency ms | IQR ms | vs limit | images/s | peak MB | GFLOP | build s "
              "| note |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for model, entries in by_model.items():
        lines += [f"## {model}", "", header]
        for (_, setting, batch), rows in entries:
            for method in _methods(results):
                row = rows.get(method)
                if row is None:
                    continue
                lines.append(
                    f"| {setting} | {batch} | {method} | {_format(row.get('latency_ms'), '{:.2f}')} | "
                    f"{_format(row.get('iqr_ms'), '{:.2f}')} | {_format(_ratio(rows, method, 'limit'), '{:.3f}')} | "
                    f"{_format(row.get('throughput'), '{:.1f}')} | {_format(row.get('peak_memory_mb'), '{:.1f}')} | "
                    f"{_format(row.get('gflops'), '{:.2f}')} | "
                    f"{_format(row.get('build_s') or None, '{:.3f}')} | {row.get('skipped') or ''} |"
                )
        lines.append("")
    text = "\n".join(lines)
    if path:
        with open(path, "w") as handle:
            handle.write(text)
    return text


def write_plot(results: dict, path: str) -> None:
    """One panel per model: each method's latency relative to the limit, per setting and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model = defaultdict(list)
    for key, rows in _groups(results).items():
        by_model[key[0]].append((key, rows))
    methods = [m for m in _methods(results) if m not in ("eager",)]
    figure, axes = plt.subplots(len(by_model), 1, figsize=(10, 3.2 * len(by_model)), squeeze=False)
    for axis, (model, entries) in zip(axes[:, 0], by_model.items()):
        width = 0.8 / len(methods)
        for m, method in enumerate(methods):
            xs, ys, errors = [], [], []
            for g, (_, rows) in enumerate(entries):
                ratio = _ratio(rows, method, "limit")
                if ratio is not None:
                    xs.append(g + (m - (len(methods) - 1) / 2) * width)
                    ys.append(ratio)
                    errors.append(rows[method]["iqr_ms"] / rows["limit"]["latency_ms"] / 2)
            if xs:  # error bars: half the IQR, relative to the limit
                axis.bar(xs, ys, width, yerr=errors, capsize=2, label=method, color=COLORS.get(method))
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.axhline(1.02, color="grey", linewidth=0.8, linestyle="--")
        axis.set_xticks(range(len(entries)))
        axis.set_xticklabels([f"{setting}\nbatch {batch}" for (_, setting, batch), _ in entries], fontsize=8)
        axis.set_ylabel("latency / limit")
        axis.set_title(model, fontsize=10)
        values = [r for _, rows in entries for m in methods if (r := _ratio(rows, m, "limit")) is not None]
        if values:
            axis.set_ylim(max(0.0, min(values) - 0.15), max(values) + 0.15)
        axis.legend(fontsize=7, ncol=len(methods), loc="upper left")
    figure.suptitle(f"{results['device_name']}, {results['settings']['dtype']}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def merged(runs: list[dict]) -> dict:
    """One report of several runs with the same settings but different models (``benchmarks/gpu.sh`` runs each
    model in its own process): the first run's header, every run's rows, the models in run order."""
    results = dict(runs[0])
    results["results"] = [row for run in runs for row in run["results"]]
    results["settings"] = dict(results["settings"], models=[m for run in runs for m in run["settings"]["models"]])
    results["command"] = "; ".join(run["command"] for run in runs)
    return results


def main(argv: list[str] | None = None) -> None:
    """Re-render the reports of saved runs, merged when several are given:
    ``python -m benchmarks.report a.json [b.json ...] [--out merged.json] --markdown M --plot P``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", help="the merged results as JSON")
    parser.add_argument("--markdown")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    runs = []
    for path in args.results:
        with open(path) as handle:
            runs.append(json.load(handle))
    results = merged(runs)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    if args.plot:
        write_plot(results, args.plot)
    print(write_markdown(results, args.markdown, plot=args.plot))


if __name__ == "__main__":
    main()
