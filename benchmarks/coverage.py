"""``make coverage``: how much of the model zoo fxfeat handles, measured, with the reason for every miss.

The zoo is the smallest model of every timm family (families are timm's model modules, ``timm.list_modules()``;
"smallest" by parameter count; timm's ``test_*`` models, reduced-size variants made for timm's own CI, are left
out) and every torchvision classification model. Each model is checked by
:func:`benchmarks.coverage_check.check_model` in a worker process under a time limit, two workers at a time
(one thread each). The report gives, for the *CNN-style* timm families (declared reductions that rise level by
level) and for all of them: how many compile, how many have timm's levels contained in fxfeat's (equal tensors),
identical level lists, declared levels equal to timm's ``features_only``, ``output_stride=8`` parity where timm
supports it, outputs equal to eager, the median compile time, and opaque modules. It also flags every
torchvision model whose levels changed since the previous report. A section for other libraries' models
(efficientnet_pytorch, pretrainedmodels, Hugging Face ``*Backbone`` counterparts, segmentation_models_pytorch
encoders) checks each against its own library's maps (:mod:`benchmarks.coverage_libraries`). Every model's head
features (``pooled``, ``embedding``, timm's ``unpooled``; docs/heads.md) are checked against its library's own
outputs: timm's with the classifier and headless (``num_classes=0``), torchvision's with the classifier and with an
``nn.Identity`` head, the other libraries' against their models' vectors; the report counts them and lists every
miss with its reason.

Usage::

    python -m benchmarks.coverage [--models timm:resnet50 torchvision:vgg11 ...] [--timeout 240] [--workers 2]
        [--out docs/coverage.json] [--markdown docs/coverage.md] [--refresh-families]

``--models`` also takes the other libraries' models (``efficientnet_pytorch:efficientnet-b0``,
``pretrainedmodels:dpn68``, ``transformers:ConvNextBackbone``, ``smp:resnet18``), reported in their section.

The family -> smallest model table is cached in ``benchmarks/timm_families.json`` for the timm version that
made it (building every timm model on the ``meta`` device to count its parameters takes minutes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

__all__ = ["main", "summarise", "timm_families"]

FAMILIES_CACHE = Path(__file__).with_name("timm_families.json")
DEFAULT_TIMEOUT_S = 320  # deepseek_vit_412m alone: 198 s on the Xeon VM, 264 s on the AMD EPYC one
PARTIAL = "partial"  # tags a worker's message (PARTIAL, result so far) sent before its final result


def timm_families(refresh: bool = False) -> dict[str, dict[str, Any]]:
    """``{family: {"model": smallest model, "params": its parameter count}}`` for timm's installed version."""
    import timm
    import torch

    if FAMILIES_CACHE.exists() and not refresh:
        cached = json.loads(FAMILIES_CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    families = {}
    for family in timm.list_modules():
        sizes = []
        for name in timm.list_models(module=family):
            if name.startswith("test_"):
                continue
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            sizes.append((sum(p.numel() for p in model.parameters()), name))
        if sizes:
            params, name = min(sizes)
            families[family] = dict(model=name, params=params)
    FAMILIES_CACHE.write_text(json.dumps(dict(timm=timm.__version__, families=families), indent=1) + "\n")
    return families


def _cases(args) -> list[dict[str, str]]:
    if args.models:
        from benchmarks.coverage_libraries import LIBRARIES

        cases = []
        for spec in args.models:
            library, _, name = spec.partition(":")
            family = name if library == "timm" or library in LIBRARIES else "torchvision"
            cases.append(dict(library=library, name=name, family=family))
        return cases
    import torchvision

    families = timm_families(refresh=args.refresh_families)
    cases = [dict(library="timm", name=entry["model"], family=family) for family, entry in sorted(families.items())]
    cases += [dict(library="torchvision", name=name, family="torchvision")
              for name in torchvision.models.list_models(module=torchvision.models)]
    return cases


def _worker(connection, without_registry: bool = False) -> None:
    """Check the models sent over ``connection`` one at a time until it sends ``None``; with
    ``without_registry``, fxfeat ignores timm's registry of untraceable layers (a measurement of what the
    registry is worth, not a user option)."""
    import torch

    torch.set_num_threads(1)
    if without_registry:
        import fxfeat.trace.registries

        fxfeat.trace.registries.READ_LIBRARY_REGISTRIES = False
    from benchmarks.coverage_check import check_model, describe_error
    from benchmarks.coverage_libraries import LIBRARIES, check_library_model

    while True:
        case = connection.recv()
        if case is None:
            return
        start = time.perf_counter()

        def levels_checked(partial, case=case, start=start):  # kept by the pool if the head checks run too long
            connection.send((PARTIAL, dict(partial, family=case["family"],
                                           seconds=round(time.perf_counter() - start, 1))))

        try:
            check = check_library_model if case["library"] in LIBRARIES else check_model
            result = check(case["library"], case["name"], on_levels_checked=levels_checked)
        except Exception as error:  # a model that does not build, or a failure outside fxfeat
            result = dict(library=case["library"], name=case["name"], error=describe_error(error))
        result.update(family=case["family"], seconds=round(time.perf_counter() - start, 1))
        connection.send(result)


def serve(connection, compute) -> None:
    """A worker loop of :class:`_Pool`: on one thread, send back ``compute(case)`` for each case received over
    ``connection`` until it sends ``None``."""
    import torch

    torch.set_num_threads(1)
    while True:
        case = connection.recv()
        if case is None:
            return
        connection.send(compute(case))


class _Pool:
    """Worker processes that each check one model at a time; a model past the time limit kills its worker.
    ``target(connection)`` is the worker loop (default: the coverage checks). A worker may send ``(PARTIAL,
    result so far)`` before its final result: the pool reports that one, its head checks failed, if the worker then
    runs past the time limit or dies."""

    def __init__(self, workers: int, timeout: float, without_registry: bool = False, target=None):
        self.target, self.args = (target, ()) if target is not None else (_worker, (without_registry,))
        self.context = multiprocessing.get_context("spawn")
        self.timeout = timeout
        self.slots = [self._start() for _ in range(workers)]

    def _start(self) -> dict[str, Any]:
        parent, child = self.context.Pipe()
        process = self.context.Process(target=self.target, args=(child, *self.args), daemon=True)
        process.start()
        return dict(process=process, connection=parent, case=None, started=0.0, partial=None)

    def run(self, cases: list[dict[str, str]], on_result) -> None:
        pending = list(reversed(cases))
        while pending or any(slot["case"] for slot in self.slots):
            for index, slot in enumerate(self.slots):
                if slot["case"] is None and pending:
                    case = pending.pop()
                    try:
                        slot["connection"].send(case)
                    except OSError:  # the idle worker died (out of memory after its last model): start another
                        slot["process"].kill()
                        slot = self.slots[index] = self._start()
                        slot["connection"].send(case)
                    slot["case"], slot["started"], slot["partial"] = case, time.monotonic(), None
            busy = [slot for slot in self.slots if slot["case"]]
            deadline = min(slot["started"] for slot in busy) + self.timeout
            ready = wait([slot["connection"] for slot in busy], timeout=max(0.0, deadline - time.monotonic()))
            for index, slot in enumerate(self.slots):
                if slot["case"] is None:
                    continue
                if slot["connection"] in ready:
                    try:
                        result = slot["connection"].recv()
                    except EOFError:  # the worker died (out of memory, a crash in native code)
                        result = self._lost(slot, "the worker process died")
                    if isinstance(result, tuple) and result[0] == PARTIAL:
                        slot["partial"] = result[1]
                        continue
                    on_result(result)
                    slot["case"] = None
                elif time.monotonic() - slot["started"] >= self.timeout:
                    on_result(self._lost(slot, f"timeout: no result within {self.timeout:.0f} s"))
                    self.slots[index] = self._start()

    def _lost(self, slot, reason: str) -> dict[str, Any]:
        """The result of a model whose worker ran past the time limit or died: its partial result, if the worker
        sent one, with the head checks failed, else the reason alone."""
        slot["process"].kill()
        slot["process"].join()
        case, seconds = slot["case"], round(time.monotonic() - slot["started"], 1)
        if slot["partial"] is not None:
            return dict(slot["partial"], heads=dict(error=f"{reason} (in the head checks)", seconds=None),
                        seconds=seconds)
        return dict(case, error=reason, seconds=seconds)

    def close(self) -> None:
        for slot in self.slots:
            if slot["process"].is_alive():
                slot["connection"].send(None)
                slot["process"].join(timeout=10)


# Why fxfeat's automatic levels differ from timm's declared ones, by family, as analysed (docs/levels.md gives
# the conventions). Rendered next to every remaining miss; a miss without an entry is flagged as not analysed.
EXPLANATIONS = {
    "coat": "multi-branch: CoaT's parallel blocks mix reductions 8 to 32 at every step; fxfeat takes each "
    "reduction's last map before the chain reaches reduction 32 (the position encodings `cpe2`, `cpe3` the last "
    "parallel block reads) and `norm4`, where timm returns the last parallel block's outputs, read only by the "
    "classification head's norms",
    "crossvit": "multi-branch: two token branches with different patch sizes exchange their class tokens at every "
    "block, so no map lies on every path; fxfeat leaves levels off the dominator chain to `levels=[...]`",
    **dict.fromkeys(
        ["gemma4_vit", "naflexvit", "tnt"],
        "patches become tokens by reshaping the image (or TNT's inner pixel tokens), never through a map, so the "
        "token order cannot be traced to a grid and the tokens are not levels (returning them as maps could be "
        "wrong, see hiera)",
    ),
    "hiera": "Hiera unrolls its map into tokens that are not in raster order (timm re-rolls them for its features); "
    "fxfeat cannot trace the order to a grid, so the blocks' tokens are not levels: only the patch embedding is",
    **dict.fromkeys(
        ["csatv2", "sequencer", "volo"],
        "timm declares several levels at one reduction in a hierarchical model (stages after the last "
        "downsampling that are not one isotropic body); fxfeat returns one level per reduction",
    ),
    "hrnet": "multi-branch: fxfeat takes each reduction's last map computed at it, the classification head's "
    "`incre_modules.0`..`.2` (timm's tensors), and at reduction 32 `final_layer`, the model's `forward_features`, "
    "where timm returns `incre_modules.3` (the head's last sum and its 1x1 convolution follow it)",
    "mobilenetv5": "multi-branch: the last stage (reduction 32) feeds a fusion adapter beside the reduction-16 stage, "
    "so it lies off the dominator chain; fxfeat leaves levels off the chain to `levels=[...]`",
    **dict.fromkeys(
        ["nasnet", "pnasnet"],
        "timm convention: each declared level is the ReLU the next reduction cell applies to its input "
        "(`conv_1x1.act`, inside that cell); fxfeat returns the last cell at each reduction before it (its levels "
        "between the stem and the last cell come from the cells reading two earlier cells, docs/levels.md rule 7), "
        "and the last cell rather than the final `act`, a layer after the trunk",
    ),
    **dict.fromkeys(
        ["ghostnet", "repghost"],
        "timm convention: timm declares the first stage of each resolution (the one that downsamples) and "
        "`conv_stem` before its norm; fxfeat returns the last map at each resolution",
    ),
    "inception_v4": "timm convention: timm declares Mixed_3a (`features.3`), the strided block, at reduction 4, "
    "not the last map at that reduction (Mixed_4a, `features.4`)",
    **dict.fromkeys(
        ["mobilevit", "nfnet"],
        "timm convention: timm declares the 1x1 `final_conv` after the stages as the last level; fxfeat counts a "
        "layer after the trunk as head, as timm does for EfficientNet's `conv_head` and FastViT's `final_conv`",
    ),
    "vovnet": "timm convention: timm declares `stem.1`, a map inside a stem that goes on to halve the resolution "
    "with a convolution; fxfeat treats such a stem as one unit, as timm does for most (LeViT, MambaOut, RepViT...)",
    "xception": "timm convention: timm declares the ReLU each block applies in place to the previous block's "
    "output; fxfeat returns the block's output as the block returned it",
    "xception_aligned": "timm declares the conv before the strided conv inside each block's residual branch, "
    "which the block's strided shortcut bypasses: it is on no dominator chain",
    **dict.fromkeys(
        ["cpubone", "efficientvit_mit", "lcnetv2", "lowformer", "starnet", "visformer"],
        "timm convention: timm leaves out the stem's map at reduction 2, which it declares for ResNet, "
        "EfficientNet, RegNet, MobileOne...; fxfeat returns it (structurally the same stem)",
    ),
}
DECLARED_EXPLANATIONS = {
    "hiera": "the declared blocks return unrolled tokens, which timm re-rolls into maps; fxfeat cannot trace their "
    "order to a grid, so it returns them as computed (`NLC`)",
    "coat": "the declared `parallel_blocks` level is one call returning the four scales; fxfeat places it on one of "
    "them, timm's wrapper reshapes each",
    "hrnet": "timm declares `stem`, `stage1`...`stage4`, but its `features_only` model returns the outputs of the "
    "classification head's `incre_modules`, which no declared module names",
}
ISOTROPIC = ("timm declares several levels at one reduction; fxfeat finds one level per reduction unless the "
             "model is one isotropic body of blocks after its last downsampling")
OUTPUT_STRIDE_EXPLANATIONS = {
    "byobnet": "timm's MobileOne blocks ignore the dilation in their training-time conv branches and drop the "
    "identity branch of dilated blocks; fxfeat dilates every kernel after the removed stride",
    "mobilevit": "timm dilates `conv_kxk` but not `conv_fusion` of the MobileViT blocks; fxfeat dilates both",
    "resnest": "timm removes the 3x3 average pool (`avd`) of a de-strided ResNeSt block; fxfeat keeps it at "
    "stride 1, which computes the undilated model's values at the positions it kept",
    "cspnext": "timm does not dilate the stride-1 max poolings of the SPP block; fxfeat does",
    "byoanet": "halo attention splits the map into blocks whose number is fixed when the graph is traced, so the "
    "denser map no longer fits: a clear OutputStrideError",
}


def _fraction(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.1f}%)" if total else "0/0"


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the results (see the module docstring for what is counted)."""
    timm_rows = [r for r in results if r["library"] == "timm"]
    cnn = [r for r in timm_rows if r.get("cnn_style")]
    tokens = [r for r in timm_rows if r.get("token_levels")]
    several_per_reduction = [r for r in timm_rows if r.get("cnn_style") is False]
    torchvision_rows = [r for r in results if r["library"] == "torchvision"]

    def count(rows, test) -> dict[str, int]:
        return dict(hits=sum(1 for r in rows if test(r)), total=len(rows))

    compiled = lambda r: "levels" in r.get("auto", {})  # noqa: E731
    supported_os = [r for r in timm_rows if r.get("output_stride", {}).get("supported")]
    times = [r["auto"]["compile_s"] for r in results if "compile_s" in r.get("auto", {})]
    return dict(
        timm_compile=count(timm_rows, compiled),
        cnn_contained=count(cnn, lambda r: r.get("auto", {}).get("contained")),
        cnn_identical=count(cnn, lambda r: r.get("auto", {}).get("identical")),
        all_contained=count(timm_rows, lambda r: r.get("auto", {}).get("contained")),
        token_share=dict(hits=len(tokens), total=len(timm_rows)),
        token_contained=count(tokens, lambda r: r.get("auto", {}).get("contained")),
        token_identical=count(tokens, lambda r: r.get("auto", {}).get("identical")),
        isotropic_contained=count(several_per_reduction, lambda r: r.get("auto", {}).get("contained")),
        all_identical=count(timm_rows, lambda r: r.get("auto", {}).get("identical")),
        declared_equal=count(cnn, lambda r: r.get("declared", {}).get("equal")),
        output_stride_equal=count(supported_os, lambda r: r["output_stride"].get("equal")),
        eager_equal=count(results, lambda r: r.get("eager_equal")),
        torchvision_compile=count(torchvision_rows, compiled),
        torchvision_eager_equal=count(torchvision_rows, lambda r: r.get("eager_equal")),
        opaque_models=sum(1 for r in results if r.get("opaque")),
        train_graph={kind: sum(1 for r in results if r.get("auto", {}).get("train_graph", "").startswith(kind))
                     for kind in ("own", "same", "fallback")},
        compile_s_median=round(statistics.median(times), 4) if times else None,
        **_head_summary(timm_rows, torchvision_rows),
    )


# The head checks' variants (benchmarks.coverage_check) as the report names them.
HEAD_VARIANTS = {"head": "with its classifier", "headless": "headless (`num_classes=0`)",
                 "identity_head": "`nn.Identity` head"}


def _head_record(result: dict[str, Any], variant: str, feature: str) -> dict[str, Any] | None:
    """One head feature's record of one variant of a model; ``None`` where it was not checked (a torchvision
    model without an ``nn.Linear`` has no ``nn.Identity``-head variant); ``{"error": ...}`` where the model's
    head checks failed as a whole (a time limit, a model that does not build)."""
    heads = result.get("heads")
    if heads is None:
        return dict(error=result.get("error", "not checked"))
    if variant == "identity_head" and heads.get("final_linear", "") is None:
        return None
    if variant in heads:
        return heads[variant].get(feature, heads[variant] if "error" in heads[variant] else None)
    return dict(error=heads.get("error", "not checked"))


def _head_summary(timm_rows, torchvision_rows) -> dict[str, Any]:
    """``{library}_{feature}_{variant}``: how many models' head features equal their library's reference."""
    def count(rows, variant, feature) -> dict[str, int]:
        records = [_head_record(r, variant, feature) for r in rows]
        records = [record for record in records if record is not None]
        return dict(hits=sum(1 for record in records if record.get("equal")), total=len(records))

    rows = [*timm_rows, *torchvision_rows]
    seconds = [r["heads"]["seconds"] for r in rows if (r.get("heads") or {}).get("seconds") is not None]
    return dict(
        heads_checked=sum(1 for r in rows if "heads" in r),
        timm_pooled_head=count(timm_rows, "head", "pooled"),
        timm_pooled_headless=count(timm_rows, "headless", "pooled"),
        timm_embedding_head=count(timm_rows, "head", "embedding"),
        timm_embedding_headless=count(timm_rows, "headless", "embedding"),
        timm_unpooled_head=count(timm_rows, "head", "unpooled"),
        torchvision_pooled_head=count(torchvision_rows, "head", "pooled"),
        torchvision_embedding_head=count(torchvision_rows, "head", "embedding"),
        torchvision_pooled_identity_head=count(torchvision_rows, "identity_head", "pooled"),
        torchvision_embedding_identity_head=count(torchvision_rows, "identity_head", "embedding"),
        heads_s_median=round(statistics.median(seconds), 2) if seconds else None,
        heads_s_max=max(seconds) if seconds else None,
    )


def _levels_text(levels) -> str:
    return " ".join(f"{level['module'] or level['node']}@{level['reduction']}" for level in levels or [])


_MAX_LISTED = 4  # missing levels named in a reason


def miss_reason(result: dict[str, Any]) -> str:
    """Why fxfeat's automatic levels differ from timm's, in a line."""
    if "error" in result:
        return result["error"]
    auto = result.get("auto", {})
    if "levels" not in auto:
        return f"compile: {auto.get('error', result.get('trace', {}).get('error', '?'))}"
    if "error" in auto:
        return f"run: {auto['error']}"
    if result.get("timm", {}).get("error"):
        return f"no timm reference: {result['timm']['error']}"
    if auto.get("identical") or "found" not in auto:
        return ""
    timm_levels, levels = result["timm_levels"] or [], auto["levels"]
    parts = []
    missing = [i for i, j in enumerate(auto["found"]) if j is None and i < len(timm_levels)]
    for i in missing[:_MAX_LISTED]:
        entry = timm_levels[i]
        same = [lv for lv in levels if lv["reduction"] == entry["reduction"]]
        instead = f" (fxfeat: {_levels_text(same)})" if same else " (no fxfeat level there)"
        parts.append(f"missing {entry['module']}@{entry['reduction']}{instead}")
    if len(missing) > _MAX_LISTED:
        parts.append(f"and {len(missing) - _MAX_LISTED} more of timm's {len(auto['found'])} levels")
    matched = {j for j in auto["found"] if j is not None}
    extra = [lv for j, lv in enumerate(levels) if j not in matched]
    if extra:
        parts.append(f"extra {_levels_text(extra)}")
    if not parts and len(timm_levels) != len(auto["found"]):
        parts.append(f"timm features_only returns {len(auto['found'])} of its {len(timm_levels)} levels")
    return "; ".join(parts)


def _declared_text(result: dict[str, Any]) -> str:
    declared = result.get("declared")
    if declared is None:
        return "-"
    return _mark(declared["equal"]) if "equal" in declared else declared.get("error", "-").replace("|", "\\|")


def _picture_link(result: dict[str, Any], markdown: Path) -> str:
    """A link to the picture of the model's levels that ``benchmarks.coverage_pictures`` drew, if it did."""
    from benchmarks.coverage_pictures import picture_path

    picture = picture_path(markdown, result["name"])
    return f" ([picture]({picture.relative_to(markdown.parent).as_posix()}))" if picture.exists() else ""


def _mark(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """Totals at the top, then a table per library with the reason for each miss."""
    summary, rows = report["summary"], report["results"]
    lines = [
        "# Coverage: fxfeat across the model zoo",
        "",
        f"Generated by `make coverage` (`python -m benchmarks.coverage`) on {report['machine']}, "
        f"{report['date']}; " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ". "
        f"{len(rows)} models, {report['wall_s'] / 60:.1f} min wall with {report['workers']} workers, "
        f"{report['timeout_s']} s limit per model."
        + ("" if report.get("timm_registry", True) else " **timm's registry of untraceable layers ignored** "
           "(`--without-registry`): every layer is traced through or made opaque by fxfeat alone."),
        "",
        "timm: the smallest model of each family, random weights; `auto` = `levels=\"auto\"` with the declared "
        "`feature_info` removed, compared tensor for tensor (`torch.equal`) with timm's `features_only` model "
        "carrying the same weights. *CNN-style*: families whose declared reductions rise level by level.",
        "",
        "| measure | result |",
        "|---|---|",
    ]
    labels = [
        ("timm_compile", "timm families that compile (`auto`)"),
        ("cnn_contained", "CNN-style: timm's levels contained in fxfeat's, equal tensors"),
        ("cnn_identical", "CNN-style: identical level lists"),
        ("all_contained", "all timm families: timm's levels contained"),
        ("all_identical", "all timm families: identical level lists"),
        ("token_share", "token families (fxfeat's levels include token sequences), share of all"),
        ("token_contained", "token families: timm's levels contained"),
        ("token_identical", "token families: identical level lists"),
        ("isotropic_contained", "families declaring several levels at one reduction (ViT-style): contained"),
        ("declared_equal", "CNN-style: declared levels (`levels=None`) equal to timm's `features_only`"),
        ("output_stride_equal", "`output_stride=8` equal to timm's dilated model (where timm has one)"),
        ("eager_equal", "outputs bit-equal to the eager model"),
        ("torchvision_compile", "torchvision classification models that compile"),
        ("torchvision_eager_equal", "torchvision: bit-equal to eager at two input sizes"),
    ]
    for key, label in labels:
        lines.append(f"| {label} | {_fraction(summary[key]['hits'], summary[key]['total'])} |")
    if summary.get("heads_checked"):
        lines += _head_summary_lines(summary, report.get("libraries") or [])
    lines.append(f"| median compile time (`auto`) | {summary['compile_s_median']} s |")
    lines.append(f"| models with opaque submodules | {summary['opaque_models']} |")
    if "train_graph" in summary:
        kinds = summary["train_graph"]
        lines.append(f"| train-mode graph: own (training-only code) / same as eval / eval graph used (not aligned) "
                     f"| {kinds['own']} / {kinds['same']} / {kinds['fallback']} |")
    changed = report.get("torchvision_changed") or []
    fallbacks = [f"{r['library']}:{r['name']} ({r['auto']['train_graph'].split('(', 1)[-1].split(')')[0]})"
                 for r in rows if r.get("auto", {}).get("train_graph", "").startswith("fallback")]
    if "train_graph" in summary:
        lines += ["", f"Models running their eval-mode graph in train mode too (the train-mode graph could not be "
                  f"aligned): {'; '.join(fallbacks) if fallbacks else 'none'}."]
    lines += ["", f"torchvision models whose levels changed since the previous report: "
              f"{', '.join(changed) if changed else 'none'}.", ""]

    heads = bool(summary.get("heads_checked"))
    lines += ["## timm", "", "| family | model | CNN-style | identical | contained | declared | os=8 | eager | "
              + ("pooled, embedding, unpooled / headless: pooled, embedding | " if heads else "")
              + "compile s | fxfeat levels | reason |", "|" + "---|" * (11 + heads)]
    for r in sorted((r for r in rows if r["library"] == "timm"), key=lambda r: r["family"]):
        auto = r.get("auto", {})
        os8 = r.get("output_stride", {})
        os_text = "-" if not os8.get("supported") else _mark(os8.get("equal"))
        if os8.get("supported") and not os8.get("equal"):
            os_text += f" ({os8.get('fxfeat', {}).get('error', 'tensors differ')})"
        lines.append("| " + " | ".join([
            r["family"], r["name"], _mark(r.get("cnn_style")), _mark(auto.get("identical")),
            _mark(auto.get("contained")), _declared_text(r), os_text, _mark(r.get("eager_equal")),
            *([_heads_cell(r, TIMM_HEAD_CHECKS)] if heads else []), str(auto.get("compile_s", "-")),
            _levels_text(auto.get("levels")), miss_reason(r).replace("|", "\\|"),
        ]) + " |")
    lines += ["", "## Misses, explained", "",
              "Every timm family where fxfeat's automatic levels are not timm's, its declared levels (CNN-style "
              "families) do not return timm's tensors, or `output_stride=8` differs from timm's dilated model, with "
              "what differs and why; each model that compiles links to the picture of its automatic levels "
              "(`fxfeat.plot(model, levels=\"auto\")`, drawn by `python -m benchmarks.coverage_pictures`).", "",
              "| family | what differs | why |", "|---|---|---|"]
    for r in sorted((r for r in rows if r["library"] == "timm"), key=lambda r: r["family"]):
        auto, os8 = r.get("auto", {}), r.get("output_stride", {})
        if not auto.get("identical"):
            why = EXPLANATIONS.get(r["family"]) or (
                ISOTROPIC if r.get("cnn_style") is False else "**not analysed yet**")
            lines.append(f"| {r['family']}{_picture_link(r, path)} | "
                         f"{miss_reason(r).replace('|', chr(92) + '|') or '-'} | {why} |")
        declared = r.get("declared", {})
        if r.get("cnn_style") and not declared.get("equal"):
            what = declared.get("error", "tensors differ from timm's features_only").replace("|", chr(92) + "|")
            why = DECLARED_EXPLANATIONS.get(r["family"], "**not analysed yet**")
            lines.append(f"| {r['family']} (declared levels) | {what} | {why} |")
        if os8.get("supported") and not os8.get("equal"):
            what = os8.get("fxfeat", {}).get("error", "tensors differ").replace("|", chr(92) + "|")
            why = OUTPUT_STRIDE_EXPLANATIONS.get(r["family"], "**not analysed yet**")
            lines.append(f"| {r['family']} (output_stride=8) | {what} | {why} |")
    lines += ["", "## torchvision", "", "| model | eager | "
              + ("pooled, embedding / `nn.Identity` head: pooled, embedding | " if heads else "")
              + "compile s | fxfeat levels | error |", "|" + "---|" * (5 + heads)]
    for r in (r for r in rows if r["library"] == "torchvision"):
        auto = r.get("auto", {})
        error = r.get("error") or auto.get("error") or r.get("eager", {}).get("error") or ""
        lines.append(f"| {r['name']} | {_mark(r.get('eager_equal'))} | "
                     + (f"{_heads_cell(r, TORCHVISION_HEAD_CHECKS)} | " if heads else "")
                     + f"{auto.get('compile_s', '-')} | "
                     f"{_levels_text(auto.get('levels'))} | {error.replace('|', chr(92) + '|')} |")
    if heads:
        lines += ["", *_head_misses(rows)]
    if report.get("libraries"):
        from benchmarks.coverage_libraries import markdown_section

        lines += ["", *markdown_section(report["libraries"])]
    path.write_text("\n".join(lines) + "\n")


TIMM_HEAD_CHECKS = (("head", ("pooled", "embedding", "unpooled")), ("headless", ("pooled", "embedding")))
TORCHVISION_HEAD_CHECKS = (("head", ("pooled", "embedding")), ("identity_head", ("pooled", "embedding")))
_HEAD_LABELS = [
    ("timm_pooled_head", "timm: `pooled` equal to `forward_head(forward_features(x), pre_logits=True)`, with the "
     "classifier"),
    ("timm_pooled_headless", "timm: `pooled` equal to `forward_head(forward_features(x), pre_logits=True)`, "
     "headless (`num_classes=0`, same weights)"),
    ("timm_embedding_head", "timm: `embedding` equal to `model(x)`, with the classifier"),
    ("timm_embedding_headless", "timm: `embedding` equal to `model(x)`, headless"),
    ("timm_unpooled_head", "timm: `unpooled` (`output_fmt=\"native\"`) equal to `forward_features(x)`"),
    ("torchvision_pooled_head", "torchvision: `pooled` equal to the model with its last `nn.Linear` replaced by "
     "`nn.Identity`"),
    ("torchvision_embedding_head", "torchvision: `embedding` equal to `model(x)`"),
    ("torchvision_pooled_identity_head", "torchvision with an `nn.Identity` head: `pooled` equal to `model(x)`"),
    ("torchvision_embedding_identity_head", "torchvision with an `nn.Identity` head: `embedding` equal to "
     "`model(x)`"),
]


def _head_summary_lines(summary: dict[str, Any], libraries: list[dict[str, Any]]) -> list[str]:
    """The summary table's rows for the head features."""
    lines = [f"| {label} | {_fraction(summary[key]['hits'], summary[key]['total'])} |" for key, label in _HEAD_LABELS]
    if libraries:
        from benchmarks.coverage_libraries import head_totals

        totals = head_totals(libraries)
        lines += [
            f"| other libraries: `embedding` equal to the model's own vector | "
            f"{_fraction(totals['embedding']['hits'], totals['embedding']['total'])} |",
            f"| other libraries: `pooled` equal to the library's pooled vector (where it has one) | "
            f"{_fraction(totals['pooled']['hits'], totals['pooled']['total'])} |",
            f"| other libraries returning no vector per image: `HeadNotFoundError`, as expected | "
            f"{_fraction(totals['no_vector']['hits'], totals['no_vector']['total'])} |",
        ]
    lines.append(f"| head checks per timm / torchvision model: median, longest | {summary['heads_s_median']} s, "
                 f"{summary['heads_s_max']} s |")
    return lines


def _heads_cell(result: dict[str, Any], checks) -> str:
    """A model's head checks in a table cell: a mark per feature, variants apart."""
    return " / ".join(" ".join(_mark(None if record is None else record.get("equal", False))
                               for record in (_head_record(result, variant, feature) for feature in features))
                      for variant, features in checks)


def _head_misses(rows: list[dict[str, Any]]) -> list[str]:
    """Every timm and torchvision head feature not equal to its reference, with what differs."""
    from benchmarks.coverage_check import head_miss

    lines = ["## Head features: misses", "",
             "Every timm and torchvision model whose `pooled`, `embedding` or `unpooled` is not bit-equal to its "
             "library's reference (see `benchmarks/coverage_check.py`), with what differs.", "",
             "| model | variant | feature | what differs |", "|---|---|---|---|"]
    for r in rows:
        checks = TIMM_HEAD_CHECKS if r["library"] == "timm" else TORCHVISION_HEAD_CHECKS
        for variant, features in checks:
            for feature in features:
                record = _head_record(r, variant, feature)
                if record is not None and not record.get("equal"):
                    lines.append(f"| {r['library']}:{r['name']} | {HEAD_VARIANTS[variant]} | `{feature}` | "
                                 f"{head_miss(record).replace('|', chr(92) + '|')} |")
    if lines[-1] == "|---|---|---|---|":
        lines.append("| none | | | |")
    return lines


def _torchvision_changes(results, previous_path: Path) -> list[str]:
    if not previous_path.exists():
        return []
    previous = {r["name"]: r.get("auto", {}).get("levels") for r in json.loads(previous_path.read_text())["results"]
                if r["library"] == "torchvision"}
    changed = []
    for r in results:
        if r["library"] == "torchvision" and r["name"] in previous:
            def key(levels):
                return [(lv["module"], lv["reduction"], lv["channels"]) for lv in levels or []]
            if key(previous[r["name"]]) != key(r.get("auto", {}).get("levels")):
                changed.append(r["name"])
    return changed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="timm:NAME or torchvision:NAME (default: the whole zoo)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per model")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/coverage.json"))
    parser.add_argument("--markdown", type=Path, default=Path("docs/coverage.md"))
    parser.add_argument("--refresh-families", action="store_true", help="recount the smallest model per family")
    parser.add_argument("--previous", type=Path, default=None,
                        help="report to compare torchvision levels with (default: the --out file before this run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--without-registry", action="store_true",
                        help="ignore timm's registry of untraceable layers (to measure what it is worth)")
    parser.add_argument("--render", action="store_true", help="only rewrite --markdown from the --out JSON")
    parser.add_argument("--without-libraries", action="store_true",
                        help="leave out the other libraries' section (efficientnet_pytorch, pretrainedmodels, "
                        "Hugging Face backbones, smp encoders)")
    args = parser.parse_args(argv)
    if args.render:
        report = json.loads(args.out.read_text())
        for result in report["results"]:
            if result["library"] == "timm":
                result["reason"] = miss_reason(result)
        report["summary"] = summarise(report["results"])
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        write_markdown(report, args.markdown)
        return report

    import timm
    import torch
    import torchvision
    from tqdm import tqdm

    from benchmarks.compile_time import cpu_name

    cases = _cases(args)
    if not args.models and not args.without_libraries:
        from benchmarks.coverage_libraries import library_cases

        cases += library_cases()
    start = time.monotonic()
    results: list[dict[str, Any]] = []
    progress = tqdm(total=len(cases), disable=args.quiet, desc="coverage", unit="model")

    def on_result(result):
        results.append(result)
        progress.set_postfix_str(result["name"][:30])
        progress.update()

    pool = _Pool(args.workers, args.timeout, args.without_registry)
    try:
        pool.run(cases, on_result)
    finally:
        pool.close()
        progress.close()
    order = {(c["library"], c["name"]): i for i, c in enumerate(cases)}
    results.sort(key=lambda r: order[(r["library"], r["name"])])
    from benchmarks.coverage_libraries import LIBRARIES, summarise_libraries

    libraries = [r for r in results if r["library"] in LIBRARIES]
    results = [r for r in results if r["library"] not in LIBRARIES]
    report = dict(
        machine=f"{cpu_name()}, {args.workers} workers x 1 thread, {platform.system()}",
        date=datetime.date.today().isoformat(),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      torchvision=torchvision.__version__, timm=timm.__version__),
        workers=args.workers, timeout_s=args.timeout, wall_s=round(time.monotonic() - start, 1),
        timm_registry=not args.without_registry,
        summary=summarise(results),
        torchvision_changed=_torchvision_changes(results, args.previous or args.out),
        results=results,
        libraries=libraries,
        libraries_summary=summarise_libraries(libraries),
    )
    for r in results:
        if r["library"] == "timm":
            r["reason"] = miss_reason(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.markdown)
    summary = report["summary"]
    print(f"wrote {args.out} and {args.markdown} ({report['wall_s'] / 60:.1f} min)")
    for key in ("timm_compile", "cnn_contained", "cnn_identical", "declared_equal", "output_stride_equal",
                "eager_equal", "torchvision_eager_equal", *(key for key, _ in _HEAD_LABELS)):
        print(f"  {key:<36} {_fraction(summary[key]['hits'], summary[key]['total'])}")
    print(f"  {'compile_s_median':<36} {summary['compile_s_median']}")
    print(f"  {'heads_s_median':<36} {summary['heads_s_median']}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
