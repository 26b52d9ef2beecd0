"""The dtype ``fxfeat.extract`` computes in, and the module the loop runs in it.

On a GPU the extractor computes in the dtype the rows are stored in when that is half precision (float16 or
bfloat16), else in float32. On the CPU it computes in float32 unless the rows are stored in half precision: then it
computes in bfloat16 where that is faster on this CPU, decided by a short timed probe of the extractor optimised in
each dtype (:func:`~fxfeat.optimize_for_inference`). No CPU flag decides alone: oneDNN reports bfloat16 support
(``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) on any AVX-512 CPU, where bfloat16 is emulated and slower, and
a CPU with AMX computes it natively, several times faster. ``compute_dtype=torch.float32``/``torch.bfloat16`` forces
either. A rerun into an existing output computes in the dtype recorded there (it is part of the configuration a
rerun must match), so parts of two compute dtypes never mix in one output.

Example:
    >>> import torch, torchvision, fxfeat
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), mode="pooled", input_size=(3, 64, 64))
    >>> choice = choose_compute_dtype(extractor, torch.device("cpu"), stored=torch.float32, requested=None)
    >>> choice.dtype, choice.reason, choice.probe
    (torch.float32, 'float32 rows', None)
    >>> choice = choose_compute_dtype(extractor, torch.device("cpu"), stored=torch.float16, requested=None)
    >>> choice.reason, dtype_name(choice.dtype) == choice.probe["chosen"], sorted(choice.probe["images_per_second"])
    ('probe', True, ['bfloat16', 'float32'])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxfeat.errors import InvalidRequestError
from fxfeat.extraction.format import recorded_configuration
from fxfeat.module import FeatureGraphModule
from fxfeat.optimize import inference_copy, optimize_for_inference

__all__ = ["COMPUTE_DTYPES", "ComputeChoice", "check_compute_dtype", "choose_compute_dtype", "describe_compute",
           "dtype_name", "inference_module", "recorded_compute_dtype"]

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.float16, torch.bfloat16)
# bfloat16 must beat float32 by this factor in the probe: a tie is no reason to round the rows more.
PROBE_MARGIN = 1.1
_PROBE_BATCH, _PROBE_WARMUP, _PROBE_CALLS = 8, 2, 3


@dataclass(frozen=True)
class ComputeChoice:
    """The compute dtype of a run and why: ``"forced"`` (``compute_dtype=``), ``"recorded"`` (an earlier run's, in
    the output), ``"probe"`` (the faster on this CPU; ``probe`` holds images/s of each dtype), ``"float32 rows"``,
    or ``"device"`` (a GPU computes in the rows' half precision)."""

    dtype: torch.dtype
    reason: str
    probe: dict[str, Any] | None = None
    modules: dict[torch.dtype, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # shared with the other ranks without the probe's modules
        return {**self.__dict__, "modules": {}}

    def as_dict(self) -> dict[str, Any]:
        return {"dtype": dtype_name(self.dtype), "reason": self.reason, "probe": self.probe}


def describe_compute(compute: dict[str, Any]) -> str:
    """A :meth:`ComputeChoice.as_dict` in words.

    Example:
        >>> describe_compute({"dtype": "bfloat16", "reason": "probe", "probe": {"images_per_second": {
        ...     "float32": 33.1, "bfloat16": 74.2}}})
        'bfloat16 (probe: float32 33.1 images/s, bfloat16 74.2 images/s)'
    """
    probe = compute.get("probe")
    speeds = ", ".join(f"{name} {speed} images/s" for name, speed in probe["images_per_second"].items()) \
        if probe else ""
    return f"{compute['dtype']} ({compute['reason']}{': ' + speeds if speeds else ''})"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_compute_dtype(compute_dtype: Any) -> None:
    """Raise :class:`~fxfeat.InvalidRequestError` unless ``compute_dtype`` is ``None``, ``torch.float32`` or
    ``torch.bfloat16`` (or ``torch.float16``, on a GPU)."""
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES.values():
        raise InvalidRequestError(f"compute_dtype must be None, torch.float32 or torch.bfloat16, not "
                                  f"{compute_dtype!r}.", hint="None decides by the rows' dtype and, on the CPU, a "
                                  "short timed probe of both.")


def recorded_compute_dtype(manifest: dict[str, Any] | None) -> torch.dtype | None:
    """The compute dtype an existing output's configuration records (``None``: no output, or one written before
    the compute dtype was recorded)."""
    name = (recorded_configuration(manifest) or {}).get("compute_dtype") if manifest is not None else None
    return COMPUTE_DTYPES.get(name)


def choose_compute_dtype(extractor: FeatureGraphModule, device: torch.device, stored: torch.dtype,
                         requested: torch.dtype | None, recorded: torch.dtype | None = None,
                         optimize: bool = True) -> ComputeChoice:
    """The dtype to compute in (see the module docstring): ``requested`` if given; else an existing output's
    ``recorded`` one; else float32 for float32 rows; else on a GPU the rows' half precision, and on the CPU the
    faster of float32 and bfloat16 in a timed probe (whose modules the choice keeps, for the loop to reuse)."""
    if requested is not None:
        return ComputeChoice(requested, "forced")
    if recorded is not None:
        return ComputeChoice(recorded, "recorded")
    if stored not in HALF:
        return ComputeChoice(torch.float32, "float32 rows")
    if device.type != "cpu":
        return ComputeChoice(stored, "device")
    return _probe(extractor, device, optimize)


def _probe(extractor: FeatureGraphModule, device: torch.device, optimize: bool) -> ComputeChoice:
    """Time a few calls of the extractor on a random batch in float32 and in bfloat16; the faster wins (bfloat16
    by :data:`PROBE_MARGIN`)."""
    x = torch.randn(_PROBE_BATCH, *extractor.input_size, device=device)
    modules, speeds = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        module = modules[dtype] = inference_module(extractor, device, dtype, optimize)
        with torch.inference_mode():
            for _ in range(_PROBE_WARMUP):
                module(x)
            best = float("inf")
            for _ in range(_PROBE_CALLS):
                started = time.perf_counter()
                module(x)
                best = min(best, time.perf_counter() - started)
        speeds[dtype_name(dtype)] = round(_PROBE_BATCH / best, 2)
    faster = speeds["bfloat16"] >= PROBE_MARGIN * speeds["float32"]
    chosen = torch.bfloat16 if faster else torch.float32
    probe = {"chosen": dtype_name(chosen), "images_per_second": speeds, "batch": _PROBE_BATCH,
             "margin": PROBE_MARGIN}
    return ComputeChoice(chosen, "probe", probe, {chosen: modules[chosen]})


def inference_module(extractor: FeatureGraphModule, device: torch.device, compute: torch.dtype,
                     optimize: bool) -> nn.Module:
    """The module the loop runs: an inference copy on ``device`` (the model's own modules are never moved or
    switched to eval mode), in ``compute``, optimised unless ``optimize=False``."""
    module = inference_copy(extractor).to(device)
    if optimize:
        return optimize_for_inference(module, dtype=None if compute == torch.float32 else compute)
    return _CastInput(module.to(compute), compute) if compute != torch.float32 else module


class _CastInput(nn.Module):
    """A module converted to a half dtype, given the loop's float32 batches: each batch cast first (as
    ``optimize_for_inference(dtype=...)`` does in its graph)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x: torch.Tensor):
        return self.module(x.to(self.dtype))
