"""Build time of an extractor: fxfeat.compile vs torchvision's create_feature_extractor vs timm's wrapper.

All three are measured in one process, on the same model objects, on the same feature levels:

- ``fxfeat``: ``fxfeat.compile(model)`` (trace, two shape probes, analyses, rewrite, build);
- ``torchvision``: ``create_feature_extractor(model, return_nodes=<fxfeat's level modules>)`` (it traces the
  model twice, in train and eval mode);
- ``timm``: timm cannot wrap an existing model (``features_only`` builds a model of a feature class of its
  own), so its figure is ``create_model(name, features_only=True)`` with random weights; ``create_model(name)``
  is timed beside it, so the difference shows what asking for features adds (it is within noise).

Usage: ``python -m benchmarks.compile_time [--models resnet50 ...] [--repeats 5] [--out results.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings

import timm
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

import fxfeat

DEFAULT_MODELS = ["resnet50", "efficientnet_b0", "convnext_tiny"]


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_time(fn, repeats: int, setup=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        argument = setup()
        start = time.perf_counter()
        fn(argument)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxfeat.compile(model)  # warm-up: imports and first-call caches are not build time
        modules = fxfeat.compile(model).feature_info.module_name()
        results = {
            "model": name,
            "levels": modules,
            "fxfeat_s": _median_time(lambda _: fxfeat.compile(model), repeats),
            "torchvision_s": _median_time(lambda _: create_feature_extractor(model, return_nodes=modules), repeats),
            "timm_features_only_create_s": _median_time(
                lambda _: timm.create_model(name, pretrained=False, features_only=True), repeats
            ),
            "timm_create_s": _median_time(lambda _: timm.create_model(name, pretrained=False), repeats),
        }
    results["timm_extra_s"] = results["timm_features_only_create_s"] - results["timm_create_s"]
    results["fxfeat_over_torchvision"] = results["fxfeat_s"] / results["torchvision_s"]
    results["fxfeat_over_timm_features_only"] = results["fxfeat_s"] / results["timm_features_only_create_s"]
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="timm model names")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = [measure(name, args.repeats) for name in args.models]
    print(f"Build time, median of {args.repeats}, CPU: {cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"timm {timm.__version__}")
    print(f"{'model':<18}{'fxfeat':>9}{'torchvision':>13}{'timm features_only':>20}{'(plain create)':>16}"
          f"{'fxfeat/torchvision':>20}{'fxfeat/timm':>13}")
    for row in rows:
        print(f"{row['model']:<18}{row['fxfeat_s'] * 1e3:>7.0f}ms{row['torchvision_s'] * 1e3:>11.0f}ms"
              f"{row['timm_features_only_create_s'] * 1e3:>18.0f}ms{row['timm_create_s'] * 1e3:>14.0f}ms"
              f"{row['fxfeat_over_torchvision']:>20.2f}{row['fxfeat_over_timm_features_only']:>13.2f}")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(dict(device=f"cpu: {cpu_name()}", threads=torch.get_num_threads(), torch=torch.__version__,
                           torchvision=torchvision.__version__,
                           timm=timm.__version__, results=rows), handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
