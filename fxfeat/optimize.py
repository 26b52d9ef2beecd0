"""``fxfeat.optimize_for_inference``: an extractor rewritten for inference speed, on the CPU and the GPU.

A compiled extractor runs exactly the work of the truncated model, as the model's own code does it. Owning the
graph, fxfeat can do better for inference: on a copy of the eval-mode graph it

1. traces into library norm classes (timm's ``BatchNormAct2d``): :mod:`fxfeat.passes.inline_norms`;
2. removes no-ops (``nn.Identity``, dropout in eval mode): :mod:`fxfeat.passes.remove_no_ops`;
3. folds batch norms into the convolution or linear layer before them: :mod:`fxfeat.passes.fold_batch_norm`;
4. computes activations and residual sums in place where the data flow proves it safe:
   :mod:`fxfeat.passes.in_place`;
5. on the CPU in float32, runs convolutions and linear layers with weights packed by oneDNN, each with the
   activation after it in the same call, and a convolution's residual sum (and the ReLU after it) too:
   :mod:`fxfeat.passes.fuse_onednn`;
6. converts the weights (and each input) to channels-last and/or ``dtype``;
7. optionally wraps the result with ``torch.compile`` (CUDA graphs on the GPU), warmed up once; how it compiles
   (the mode, Inductor's freezing, a static or dynamic batch) is a :class:`CompileSettings`, the levers
   ``benchmarks/gpu.sh`` measures against each other.

The result is an :class:`InferenceGraphModule`: eval mode only, no autograd (its forward runs under
``torch.no_grad()``, its parameters do not require gradients), the same ``feature_info``, its own copy of the
weights (the model and the extractor are never changed).

Example:
    >>> import torch, torchvision, fxfeat
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1, 2)).eval()
    >>> fast = fxfeat.optimize_for_inference(extractor)
    >>> fast.optimizations["fold_batch_norms"], fast.optimizations["channels_last"]
    (10, True)
    >>> x = torch.randn(2, 3, 96, 128)
    >>> all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(fast(x), extractor(x)))
    True
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fxfeat.errors import InvalidModelError, InvalidRequestError
from fxfeat.module import FeatureGraphModule
from fxfeat.passes.convert_layout import convert_layout
from fxfeat.passes.driver import run_passes
from fxfeat.passes.fold_batch_norm import fold_batch_norms
from fxfeat.passes.fuse_onednn import fuse_residual_sums, use_onednn
from fxfeat.passes.in_place import restore_in_place
from fxfeat.passes.inline_norms import inline_norm_layers
from fxfeat.passes.remove_no_ops import remove_no_ops
from fxfeat.runtime.onednn import onednn_available
from fxfeat.trace.values import example_batch

__all__ = ["CompileSettings", "InferenceGraphModule", "inference_copy", "optimize_for_inference"]

_OPTIMIZATIONS = "fxfeat_optimizations"  # meta key: what optimize_for_inference did


@dataclass(frozen=True)
class CompileSettings:
    """How ``optimize_for_inference(compile=...)`` calls ``torch.compile``.

    Attributes:
        mode: ``torch.compile``'s mode; ``None``: ``"reduce-overhead"`` (CUDA graphs) on the GPU, the default mode on
            the CPU. ``"max-autotune"`` benchmarks kernel choices while compiling (minutes on a GPU).
        freezing: Inductor's freezing: the weights become constants of the compiled graph, so it folds them
            (layout conversions, constant subexpressions) and picks the convolution layout once. The module is
            inference-only, so its weights do not change; a weight changed in place after compiling is not seen.
        dynamic: one graph for every batch size above 1 (the batch dimension marked dynamic); ``False`` compiles
            one static graph per batch size, each specialised (and recompiled for a new size).

    Example:
        >>> CompileSettings(), CompileSettings(freezing=True, dynamic=False).options("cuda")
        (CompileSettings(mode=None, freezing=False, dynamic=True), {'triton.cudagraphs': True, 'freezing': True})
    """

    mode: str | None = None
    freezing: bool = False
    dynamic: bool = True

    def options(self, device_type: str) -> dict[str, Any]:
        """Inductor's options for ``torch.compile(options=...)``: the mode's, plus freezing."""
        from torch._inductor import list_mode_options

        mode = self.mode or ("reduce-overhead" if device_type == "cuda" else "default")
        options = dict(list_mode_options(mode))
        if self.freezing:
            options["freezing"] = True
        return options

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "freezing": self.freezing, "dynamic": self.dynamic}


class InferenceGraphModule(FeatureGraphModule):
    """An extractor for inference only: always in eval mode, its forward runs without autograd.

    ``optimizations`` says what :func:`optimize_for_inference` did (passes and how many nodes each changed,
    layout, dtype).
    """

    __jit_unused_properties__ = [*FeatureGraphModule.__jit_unused_properties__, "optimizations"]

    @property
    def optimizations(self) -> dict[str, Any]:
        return dict(self.meta.get(_OPTIMIZATIONS, {}))

    def train(self, mode: bool = True) -> InferenceGraphModule:
        if mode:
            raise InvalidRequestError(
                "an extractor optimised for inference cannot train (its batch norms are folded into the layers "
                "before them and its weights do not require gradients)",
                hint="train the extractor fxfeat.compile returned, then call optimize_for_inference again",
            )
        return super().train(False)

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return super().__call__(*args, **kwargs)


def inference_copy(extractor: FeatureGraphModule) -> InferenceGraphModule:
    """An :class:`InferenceGraphModule` running ``extractor``'s eval-mode graph with copies of its weights, which
    do not require gradients.

    Example:
        >>> import torchvision, fxfeat
        >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,))
        >>> copied = inference_copy(extractor)
        >>> copied.training, copied.get_submodule("conv1") is extractor.get_submodule("conv1")
        (False, False)
    """
    module = extractor.copy_as(InferenceGraphModule, mode="eval")
    module.requires_grad_(False)
    return module


def optimize_for_inference(
    extractor: FeatureGraphModule,
    *,
    channels_last: bool | None = None,
    dtype: torch.dtype | None = None,
    compile: bool | CompileSettings = False,
) -> nn.Module:
    """An inference-only copy of ``extractor`` rewritten to run faster (see the module docstring).

    Args:
        extractor: what :func:`fxfeat.compile` returned, on the device it will run on.
        channels_last: compute in channels-last layout (weights converted, each input converted at the start).
            ``None`` decides by the rule documented in docs/inference.md: channels-last when the graph's
            convolutions are 2D and do most of the work (more 2D convolutions than linear layers applied to
            tokens), on the CPU and the GPU.
        dtype: run in this floating dtype (``torch.bfloat16``, ``torch.float16``): weights converted, each input
            cast at the start, outputs in ``dtype``. ``None`` keeps the extractor's dtype.
        compile: wrap the result with ``torch.compile`` and run it once, so that the first call is not the
            compilation: ``True`` compiles with ``CompileSettings()`` (``mode="reduce-overhead"``, CUDA graphs, on
            the GPU; a dynamic batch dimension); a :class:`CompileSettings` chooses the mode, Inductor's freezing and
            static shapes.

    Returns:
        An :class:`InferenceGraphModule`, or with ``compile=True`` the ``torch.compile`` wrapper of one (it
        forwards ``feature_info`` and ``optimizations``). Outputs are in the extractor's ``output_fmt``; with
        channels-last, NCHW maps are computed (and returned) in channels-last memory, as a channels-last model
        returns them.

    Raises:
        InvalidModelError: ``extractor`` is not an extractor fxfeat compiled.
        InvalidRequestError: ``dtype`` is not a floating dtype, or ``channels_last`` not ``None``/a bool.
    """
    _check_arguments(extractor, channels_last, dtype, compile)
    started = time.perf_counter()
    module = inference_copy(extractor)
    example = example_batch(module, module.input_size, batch=2)  # on the parameters' device, in their dtype
    done: dict[str, Any] = run_passes(module, [inline_norm_layers])
    ShapeProp(module).propagate(example)  # tensor shapes and dtypes, for the passes that need them
    if channels_last is None:
        channels_last = _convolutions_dominate(module, example)
    passes = [remove_no_ops, fold_batch_norms, restore_in_place]
    target_dtype = dtype or example.dtype
    if example.device.type == "cpu" and target_dtype == torch.float32 and not compile and onednn_available():
        passes += [fuse_residual_sums, use_onednn]
    done.update(run_passes(module, passes))
    module.delete_all_unused_submodules()  # the folded norms, the removed no-ops: their memory
    done.update(channels_last=channels_last, dtype=str(target_dtype).removeprefix("torch."))
    run_passes(module, [functools.partial(convert_layout, channels_last=channels_last, dtype=dtype)])
    done["build_s"] = round(time.perf_counter() - started, 3)
    module.meta[_OPTIMIZATIONS] = done
    if compile:
        settings = compile if isinstance(compile, CompileSettings) else CompileSettings()
        done["compile"] = settings.as_dict()
        return _compiled(module, example.to(dtype=target_dtype), settings)
    return module


def _check_arguments(extractor, channels_last, dtype, compile) -> None:
    if not isinstance(extractor, FeatureGraphModule):
        hint = ("optimise the extractor itself: fxfeat.optimize_for_inference(backbone.body)" if
                isinstance(getattr(extractor, "body", None), FeatureGraphModule) else
                "compile the model first: fxfeat.optimize_for_inference(fxfeat.compile(model))")
        raise InvalidModelError(f"optimize_for_inference takes an extractor fxfeat compiled, not "
                                f"{type(extractor).__name__}", hint=hint)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InvalidRequestError(f"dtype must be a floating torch.dtype or None, not {dtype!r}",
                                  hint="e.g. dtype=torch.bfloat16")
    if channels_last not in (None, True, False):
        raise InvalidRequestError(f"channels_last must be True, False or None, not {channels_last!r}",
                                  hint="None lets fxfeat decide (docs/inference.md)")
    if not isinstance(compile, (bool, CompileSettings)):
        raise InvalidRequestError(f"compile must be True, False or a CompileSettings, not {compile!r}",
                                  hint="e.g. compile=fxfeat.CompileSettings(freezing=True, dynamic=False)")


def _convolutions_dominate(module: fx.GraphModule, example: torch.Tensor) -> bool:
    """The layout rule: channels-last for 4D inputs when 2D convolutions outnumber the linear layers that run on
    token sequences (3D inputs). A ConvNeXt's linear layers run on channels-last maps (4D) and count for it; a
    ViT's run on tokens and count against it."""
    if example.dim() != 4:
        return False
    convolutions = tokens = 0
    for node in module.graph.nodes:
        if node.op == "call_module":
            layer = module.get_submodule(node.target)
            convolutions += isinstance(layer, nn.Conv2d)
            tokens += isinstance(layer, nn.Linear) and _rank(node.args[0]) == 3
        elif node.op == "call_function" and node.target is torch.nn.functional.conv2d:
            convolutions += 1
    return convolutions > tokens


def _rank(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return len(meta.shape) if hasattr(meta, "shape") else None


def _compiled(module: InferenceGraphModule, example: torch.Tensor, settings: CompileSettings) -> nn.Module:
    """``torch.compile`` of ``module`` as ``settings`` say, run on ``example`` (twice with CUDA graphs: a warm-up
    run, then the recording)."""
    options = settings.options(example.device.type)
    compiled = torch.compile(module, options=options, dynamic=None if settings.dynamic else False)
    if settings.dynamic:
        torch._dynamo.maybe_mark_dynamic(example, 0)  # one graph for every batch above 1 (dynamo specialises 1)
    for _ in range(2 if options.get("triton.cudagraphs") else 1):
        compiled(example)
    return compiled
