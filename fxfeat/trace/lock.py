"""Tracing is serialised process-wide, and confined to the thread that traces.

Tracing changes state the whole process shares, for its duration: ``torch.fx`` replaces
``torch.nn.Module.__call__`` and ``__getattr__``, the functions registered with ``torch.fx.wrap`` and the
autowrapped ones (``math.sqrt`` imported into a model's module) in the globals of the code it traces through;
shape-aware tracing replaces torch's tensor factories (``torch.zeros``...); a probe puts meta tensors in place of
the model's parameters and buffers; and compiling flips the model's training flags, lets its layers update their
buffers and forks the random number generators. Each of them puts back, on exit,
what it found on entry. Two of them interleaved in two threads find each other's replacements and put those
back: ``nn.Module.__call__`` stays a dead tracer's hook, and every model in the process then fails its own eager
forward. :func:`trace_lock` is one re-entrant lock for the process, held by everything in fxfeat that traces,
probes or temporarily changes a model or torch (:func:`fxfeat.compile`, :func:`fxfeat.inspect`, the trace
stage's entry points, the exports' eval mode), so that concurrent calls give the results of sequential ones.

While one thread traces, the replaced ``nn.Module.__call__`` and ``__getattr__`` are seen by every thread. A
:class:`ThreadConfinedTracer` records only its own thread's module calls and attribute reads; other threads'
(a model running eagerly elsewhere) pass straight through, as outside tracing. What the lock cannot cover: a
model being compiled, used meanwhile by another thread (its flags, buffers and, during a probe, its parameters
are not its own until the compile ends: run it elsewhere only once ``compile`` has returned); random numbers
drawn by other threads during a compile (the generators are set back when it ends); and torch.fx tracing that
does not take the lock (another library's: hold :func:`trace_lock` around it).

Example:
    >>> import threading, torch
    >>> from torch import nn
    >>> graphs = []
    >>> def trace():
    ...     graphs.append(ThreadConfinedTracer().trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())))
    >>> threads = [threading.Thread(target=trace) for _ in range(4)]
    >>> for thread in threads:
    ...     thread.start()
    >>> for thread in threads:
    ...     thread.join()
    >>> [len(graph.nodes) for graph in graphs]
    [4, 4, 4, 4]
    >>> with trace_lock():  # your own torch.fx tracing, serialised with fxfeat's
    ...     graph = torch.fx.symbolic_trace(nn.ReLU()).graph
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch.fx as fx

__all__ = ["ThreadConfinedTracer", "trace_lock"]

_LOCK = threading.RLock()  # re-entrant: compiling traces, and tracing probes, in the same thread


@contextlib.contextmanager
def trace_lock() -> Iterator[None]:
    """Hold the process-wide lock of fxfeat's tracing for the duration (re-entrant: a thread holding it may take
    it again). Also a decorator: ``@trace_lock()``."""
    with _LOCK:
        yield


class ThreadConfinedTracer(fx.Tracer):
    """An ``fx.Tracer`` that traces under :func:`trace_lock` and records only the calls made by the thread that
    traces: module calls and attribute reads of other threads run as they do outside tracing."""

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with trace_lock(), _own_thread_only(self):
            return super().trace(root, concrete_args)


@contextlib.contextmanager
def _own_thread_only(tracer: fx.Tracer) -> Iterator[None]:
    """Shadow ``tracer``'s ``call_module`` and ``getattr`` (what torch.fx's replaced ``nn.Module.__call__`` and
    ``__getattr__`` hand every call to) with methods that pass other threads' calls through. Shadowing on the
    instance, after any subclass's overrides, keeps them first whatever a subclass overrides."""
    owner = threading.get_ident()
    record_call, record_attribute = tracer.call_module, tracer.getattr

    def call_module(module, forward, args, kwargs):
        if threading.get_ident() != owner:
            return forward(*args, **kwargs)
        return record_call(module, forward, args, kwargs)

    def read_attribute(attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != owner:
            return attr_val
        return record_attribute(attr, attr_val, parameter_proxy_cache)

    tracer.call_module, tracer.getattr = call_module, read_attribute
    try:
        yield
    finally:
        del tracer.call_module, tracer.getattr
