"""The extractors the harness compares, each built from one model for one setting.

- ``eager``: the whole model, as a classifier (the cost of not extracting at all);
- ``limit``: the eager model run only as far as the last requested feature: forward hooks collect the levels
  and stop the forward right after the last one (a pre-hook on the classifier for pooled features);
- ``timm``: timm's own answer for timm models (``features_only``, ``forward_features``, ``forward_head(...,
  pre_logits=True)``), with the same weights and ``output_stride``;
- ``torchvision``: ``create_feature_extractor`` on the same nodes;
- ``fxfeat`` and ``fxfeat+compile`` (``torch.compile`` of the extractor);
- ``fxfeat+optimize``: ``fxfeat.optimize_for_inference`` of the extractor (in the run's dtype),
  ``fxfeat+optimize-nchw`` the same with ``channels_last=False`` (what the layout rule is measured by), and
  ``fxfeat+optimize+compile`` (``compile=True``: CUDA graphs on the GPU);
- ``timm+compile``: timm's model compiled as a user would (``mode="reduce-overhead"`` on the GPU) under autocast,
  and ``timm+compile-weights`` the same with its weights converted to the run's dtype (bf16 weights rather than
  autocast; only for a half dtype): the faster of the two is the best the peers offer;
- ``fxfeat+optimize+compile[LEVER]``: ``optimize_for_inference(compile=CompileSettings(...))`` with one of
  :data:`LEVERS` (Inductor's freezing, static shapes, max-autotune), each measured against the default.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import fxfeat
from benchmarks.references import timm_feature_model

# The compile levers of issue 22, by name: what `optimize_for_inference(compile=...)` is measured with besides its
# default (`--levers NAME ...`).
LEVERS = {
    "frozen": fxfeat.CompileSettings(freezing=True),
    "static": fxfeat.CompileSettings(dynamic=False),
    "frozen-static": fxfeat.CompileSettings(freezing=True, dynamic=False),
    "autotune": fxfeat.CompileSettings(mode="max-autotune", freezing=True, dynamic=False),
}


@dataclass
class Setting:
    """What is extracted: ``mode``, ``out_indices`` and ``output_stride`` as for ``fxfeat.compile``."""

    mode: str = "features"
    out_indices: tuple[int, ...] | None = None
    output_stride: int | None = None

    @property
    def label(self) -> str:
        parts = [self.mode if self.mode != "features" else
                 ("all levels" if self.out_indices is None else f"out_indices={self.out_indices}")]
        if self.output_stride:
            parts.append(f"os{self.output_stride}")
        return ", ".join(parts)

    def compile_kwargs(self) -> dict:
        kwargs = dict(mode=self.mode, output_stride=self.output_stride)
        if self.mode == "features":
            kwargs["out_indices"] = self.out_indices
        return kwargs


@dataclass
class Method:
    """One way of getting the features; ``fn`` is ``None`` (with ``skipped`` saying why) when unavailable."""

    name: str
    fn: Callable | None
    build_s: float = 0.0
    skipped: str | None = None
    extra: dict = field(default_factory=dict)


class _Stop(Exception):
    pass


class EagerPrefix:
    """Runs an eager model with hooks that collect the requested tensors, stopping after the last one.

    Args:
        model: the eager model.
        modules: module paths whose outputs are the features (with ``pre=True``: whose input).
        stop: raise out of the forward as soon as the last feature is computed.
        pre: collect the inputs of the modules instead of their outputs.
    """

    def __init__(self, model: nn.Module, modules: list[str], stop: bool = True, pre: bool = False):
        self.model, self.modules, self.stop, self.pre = model, list(modules), stop, pre
        self.found: dict[str, torch.Tensor] = {}

    def _collect(self, path: str, value: torch.Tensor) -> None:
        self.found[path] = value
        if self.stop and len(self.found) == len(set(self.modules)):
            raise _Stop

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        # Hooks live for one call only, so that the same model serves other methods untouched.
        self.found, handles = {}, []
        for path in set(self.modules):
            module = self.model.get_submodule(path)
            if self.pre:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, path=path: self._collect(path, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, output, path=path: self._collect(path, output)))
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [self.found[path] for path in self.modules]


def _timed(build: Callable) -> tuple[object, float]:
    start = time.perf_counter()
    result = build()
    return result, time.perf_counter() - start


def _eager_model(spec: str, model: nn.Module, setting: Setting) -> nn.Module | None:
    """The eager model at the setting's output stride: the model itself, or timm's dilated twin."""
    if not setting.output_stride:
        return model
    library, _, name = spec.partition(":")
    if library != "timm":
        return None
    import timm

    twin = timm.create_model(name, pretrained=False, output_stride=setting.output_stride)
    twin.load_state_dict(model.state_dict())
    return twin.to(next(model.parameters()).device).eval()


def build_methods(
    spec: str, model: nn.Module, setting: Setting, prepare: Callable, use_compile: bool, output_fmt: str = "native",
    dtype: torch.dtype = torch.float32, skip: frozenset[str] = frozenset(), levers: tuple[str, ...] = (),
) -> list[Method]:
    """Every method for ``model`` (already on its device and memory format) and ``setting``.

    ``prepare(module)`` moves a newly built module to the run's device and memory format. fxfeat returns
    ``output_fmt`` ("native" by default, so channels-last maps compare with the other methods as computed).
    ``dtype`` is the run's (the other methods run under autocast to it; ``optimize_for_inference`` converts).
    The methods named in ``skip`` are not built (compiling takes minutes on a GPU machine's clock); ``levers`` names
    the :data:`LEVERS` measured as ``fxfeat+optimize+compile[NAME]`` (with ``use_compile``).
    """
    methods: list[Method] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor, build_s = _timed(
            lambda: fxfeat.compile(model, output_fmt=output_fmt, **setting.compile_kwargs()).eval()
        )
    info = extractor.feature_info
    modules = info.module_name()
    eager = _eager_model(spec, model, setting)
    no_eager = "no eager model at this output_stride (timm models only)"
    methods.append(Method("eager", eager, 0.0, None if eager is not None else no_eager))

    if eager is None:
        methods.append(Method("limit", None, skipped=no_eager))
    elif setting.mode == "pooled":
        classifier = fxfeat.inspect(model).head.classifier_module
        methods.append(Method("limit", EagerPrefix(eager, [classifier], pre=True)))
    elif all(modules):
        methods.append(Method("limit", EagerPrefix(eager, modules)))
    else:
        methods.append(Method("limit", None, skipped="a level is not a module output"))

    library, _, name = spec.partition(":")
    if library == "timm" and eager is not None:
        if setting.mode == "features":
            kwargs = dict(out_indices=info.out_indices)
            if setting.output_stride:
                kwargs["output_stride"] = setting.output_stride
            timm_model, timm_s = _timed(lambda: prepare(timm_feature_model(name, model, **kwargs)))
            methods.append(Method("timm", timm_model, timm_s))
        elif setting.mode == "unpooled":
            methods.append(Method("timm", eager.forward_features))
        else:
            methods.append(Method("timm", lambda x: eager.forward_head(eager.forward_features(x), pre_logits=True)))
    else:
        methods.append(Method("timm", None, skipped="not a timm model"))

    try:
        from torchvision.models.feature_extraction import create_feature_extractor

        nodes = [module or node for module, node in zip(modules, info.get("node"))]
        if setting.output_stride:
            raise ValueError("torchvision's extractor has no output_stride")
        torchvision_extractor, torchvision_s = _timed(
            lambda: create_feature_extractor(model, return_nodes=nodes).eval()
        )
        methods.append(Method("torchvision", lambda x: list(torchvision_extractor(x).values()), torchvision_s))
    except Exception as error:  # its tracer names nodes its own way; report instead of failing the run
        methods.append(Method("torchvision", None, skipped=f"{type(error).__name__}: {str(error)[:80]}"))
    finally:  # create_feature_extractor leaves the model in training mode when it raises
        model.eval()

    methods.append(Method("fxfeat", extractor, build_s))
    def left_out(name: str) -> str | None:
        """Why a compiled method is not built, or ``None``."""
        if name in skip:
            return "left out (--skip)"
        return None if use_compile else "not requested (--compile)"

    if left_out("fxfeat+compile") is None:
        compiled = torch.compile(extractor, dynamic=True)  # one compilation for every batch size
        methods.append(Method("fxfeat+compile", compiled, 0.0, extra={"compile_on_first_call": True}))
    else:
        methods.append(Method("fxfeat+compile", None, skipped=left_out("fxfeat+compile")))
    target = None if dtype == torch.float32 else dtype
    optimized, optimize_s = _timed(lambda: fxfeat.optimize_for_inference(extractor, dtype=target))
    methods.append(Method("fxfeat+optimize", optimized, optimize_s))
    if "fxfeat+optimize-nchw" in skip:  # the layout rule's check: the same passes, NCHW
        methods.append(Method("fxfeat+optimize-nchw", None, skipped="left out (--skip)"))
    else:
        optimized, optimize_s = _timed(lambda: fxfeat.optimize_for_inference(extractor, dtype=target,
                                                                             channels_last=False))
        methods.append(Method("fxfeat+optimize-nchw", optimized, optimize_s))
    if left_out("fxfeat+optimize+compile") is None:  # built and warmed up (compiled) here: its build time
        optimized, optimize_s = _timed(lambda: fxfeat.optimize_for_inference(extractor, dtype=target, compile=True))
        methods.append(Method("fxfeat+optimize+compile", optimized, optimize_s))
    else:
        methods.append(Method("fxfeat+optimize+compile", None, skipped=left_out("fxfeat+optimize+compile")))
    for lever in levers if use_compile else ():
        optimized, optimize_s = _timed(lambda settings=LEVERS[lever]: fxfeat.optimize_for_inference(
            extractor, dtype=target, compile=settings))
        methods.append(Method(f"fxfeat+optimize+compile[{lever}]", optimized, optimize_s))
    methods += _compiled_peers(methods, model, dtype, left_out)
    return methods


def _compiled_peers(methods: list[Method], model: nn.Module, dtype: torch.dtype, left_out: Callable) -> list[Method]:
    """timm's model under ``torch.compile`` as a user calls it: under autocast, and (for a half dtype) with its
    weights in that dtype."""
    timm_method = next(method for method in methods if method.name == "timm")
    on_gpu = next(model.parameters()).device.type == "cuda"
    mode = "reduce-overhead" if on_gpu else None
    peers = []
    for name in ("timm+compile", "timm+compile-weights"):
        if name == "timm+compile-weights" and dtype == torch.float32:
            continue
        if timm_method.fn is None or left_out(name) is not None:
            peers.append(Method(name, None, skipped=timm_method.skipped or left_out(name)))
        elif name == "timm+compile":
            peers.append(Method(name, torch.compile(timm_method.fn, mode=mode), 0.0,
                                extra={"compile_on_first_call": True}))
        elif not isinstance(timm_method.fn, nn.Module):
            peers.append(Method(name, None, skipped="timm's method is not a module whose weights convert"))
        else:
            import copy

            converted = torch.compile(copy.deepcopy(timm_method.fn).to(dtype), mode=mode)
            peers.append(Method(name, lambda x, module=converted: module(x.to(dtype)), 0.0,
                                extra={"compile_on_first_call": True}))
    return peers
