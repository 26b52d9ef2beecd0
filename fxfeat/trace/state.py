"""The model's state around what fxfeat does with it: the training flags, buffers and random state restored after
tracing and probing, eval mode for the duration of a trace or an export, the attributes tracing writes undone,
and the eager module inside torch's wrappers. The user's model is never changed by fxfeat. Each change lasts while
its thread holds :func:`~fxfeat.trace.lock.trace_lock`, so that another thread compiling or exporting the same
model neither sees it nor saves it as the state to restore.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from fxfeat.errors import FxFeatWarning, InvalidModelError
from fxfeat.trace.lock import trace_lock

__all__ = ["eager_model", "evaluation_mode", "model_state_kept", "undoing_module_writes"]


@contextlib.contextmanager
def _flags_kept(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own ``training`` flag on exit."""
    flags = {module: module.training for module in model.modules()}
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag


@contextlib.contextmanager
def model_state_kept(model: nn.Module) -> Iterator[None]:
    """Restore, on exit, the model's training flags and buffer values and the random number generators (the
    CPU's and those of the model's GPUs). Tracing in train mode and probing run the model's layers: batch norms
    update their statistics and dropout draws masks. The model must not change, and a seeded training run must
    not depend on whether a model was compiled."""
    with trace_lock():
        buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
        devices = sorted({t.device.index or 0 for t in (*model.parameters(), *model.buffers()) if t.is_cuda})
        try:
            with _flags_kept(model), torch.random.fork_rng(devices=devices):
                yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration, then restore every submodule's own ``training`` flag.

    Raises:
        InvalidModelError: the module refuses to change mode (``torch.export``'s ``ExportedProgram.module()``).
    """
    with trace_lock(), _flags_kept(model):
        try:
            model.eval()
        except NotImplementedError as error:
            raise InvalidModelError(
                f"{type(model).__name__} cannot be put in eval mode ({error}); fxfeat traces a model's eval and "
                "train modes.",
                hint="compile the eager model it was made from (for torch.export: the module you exported), then "
                "export the extractor: fxfeat.export.to_exported_program(extractor).",
            ) from error
        yield


def eager_model(model: Any) -> Any:
    """The eager module to trace for ``model``: ``model`` itself, or the module a torch wrapper holds.

    ``torch.compile``'s wrapper has no Python forward of its own and ``nn.DataParallel`` /
    ``DistributedDataParallel`` split batches across devices; fxfeat compiles the module inside (sharing its
    parameters), with an ``FxFeatWarning`` saying so. Anything else is returned as it is.

    Raises:
        InvalidModelError: ``model`` is a TorchScript module (its Python forward is gone).

    Example:
        >>> import warnings, torch, torchvision
        >>> model = torchvision.models.resnet18()
        >>> with warnings.catch_warnings(record=True):
        ...     eager_model(torch.nn.DataParallel(model)) is model
        True
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidModelError(
            f"{type(model).__name__} is a TorchScript module: torch.fx traces Python forward code, which a "
            "scripted or traced module no longer has.",
            hint="compile the eager model, then script the extractor if you need TorchScript: "
            "fxfeat.export.to_torchscript(extractor).",
        )
    wrapped = _wrapped_module(model)
    if wrapped is None:
        return model
    attribute, runs = wrapped
    warnings.warn(
        f"compiling the module {type(model).__name__} wraps (model.{attribute}), which shares its parameters; the "
        f"extractor {runs}.",
        FxFeatWarning,
        stacklevel=3,
    )
    return eager_model(getattr(model, attribute))


def _wrapped_module(model: Any) -> tuple[str, str] | None:
    """(attribute holding the wrapped module, what the extractor does not do that the wrapper did), for torch's
    own wrappers."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded whenever torch.compile made a wrapper
    if dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        return "_orig_mod", ("runs eagerly: torch.compile it, or use fxfeat.optimize_for_inference(extractor, "
                             "compile=True)")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", f"runs on one device: wrap it in {type(model).__name__} again to split batches"
    return None


@contextlib.contextmanager
def undoing_module_writes(model: nn.Module) -> Iterator[None]:
    """Undo, on exit, what tracing wrote into the modules' attributes and plain containers (a cache that stored a
    proxy, a counter, a buffer assigned in ``forward``): the user's model is never changed, and a second trace
    starts from the same state."""
    with trace_lock():
        saved = []
        for module in model.modules():
            attributes = dict(module.__dict__)
            contents = {key: copy.copy(value) for key, value in attributes.items()
                        if type(value) in (dict, list, set)}
            saved.append((module, attributes, contents))
        try:
            yield
        finally:
            for module, attributes, contents in saved:
                module.__dict__.clear()
                module.__dict__.update(attributes)
                for key, snapshot in contents.items():
                    container = attributes[key]
                    if isinstance(container, list):
                        container[:] = snapshot
                    else:
                        container.clear()
                        container.update(snapshot)
