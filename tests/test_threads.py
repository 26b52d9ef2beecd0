"""fxfeat from several threads at once (issue 29): tracing and probing are serialised process-wide
(:mod:`fxfeat.trace.lock`), so concurrent ``compile`` and ``inspect`` calls, on different models and on the same
model object, give the sequential results; afterwards the models and torch are as they were. While fxfeat traces,
a model running eagerly in another thread is not traced with it.

The threads are real, started together by a barrier. Each traced model pauses once in its forward while it is
traced (the pause is outside the traced graph), so every other thread runs in the middle of its trace: without the
lock their tracers interleave on every run, whatever the machine's load."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.fx
from torch import nn

import fxfeat
from fxfeat.trace import values
from tests.conftest import timm_model

SIZE = (3, 64, 64)  # every model runs at 64x64: fast, and not the size the timm models declare


class _ShapeDependent(nn.Module):
    """Python on the input's size (``int()`` of a size, ``torch.zeros`` of sizes): plain torch.fx fails, so it is
    traced shape-aware, with torch's tensor factories replaced for the duration."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x).relu()
        height = int(x.shape[-2])
        x = x + torch.zeros(x.shape[0], 1, height, x.shape[-1])
        return self.stage(x).relu()


class _Pausing(nn.Module):
    """``model``, whose forward lets the other threads run for a moment before it calls ``model`` (while it is
    traced: in the middle of the trace)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        time.sleep(0.02)
        return self.model(x)


def _models() -> dict[str, nn.Module]:
    return {
        "resnet10t": _Pausing(timm_model("resnet10t")),
        "vit_tiny_patch16_224": _Pausing(timm_model("vit_tiny_patch16_224", img_size=SIZE[1:], depth=3)),
        "convnext_atto": _Pausing(timm_model("convnext_atto")),
        "shape_dependent": _Pausing(_ShapeDependent().eval()),
    }


# (what, model): the same model object is compiled twice and inspected at once (resnet10t, shape_dependent)
_JOBS = [("compile", "resnet10t"), ("compile", "resnet10t"), ("inspect", "resnet10t"),
         ("compile", "vit_tiny_patch16_224"), ("inspect", "convnext_atto"), ("compile", "shape_dependent"),
         ("inspect", "shape_dependent")]


def _run(job: tuple[str, str], models: dict[str, nn.Module]):
    what, name = job
    if what == "compile":
        return fxfeat.compile(models[name], input_size=SIZE).eval()
    return fxfeat.inspect(models[name], input_size=SIZE)


def _result(job: tuple[str, str], made, x: torch.Tensor):
    """What a job made, comparable: an extractor's feature_info and outputs on ``x``, an inspection's text."""
    if job[0] == "inspect":
        return str(made)
    with torch.no_grad():
        return made.feature_info.get_dicts(), made(x)


def _same(first, second) -> bool:
    if isinstance(first, str):
        return first == second
    return first[0] == second[0] and all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))


def _process_state() -> dict[str, object]:
    """What tracing and probing replace for their duration, process-wide: nn.Module's hooks, torch's tensor
    factories, the functions torch.fx wraps in the globals of the code it traces, sys.stderr."""
    state = {"Module.__call__": nn.Module.__call__, "Module.__getattr__": nn.Module.__getattr__,
             "stderr": sys.stderr, "patcher": torch.fx._symbolic_trace.CURRENT_PATCHER}
    state.update({f"torch.{name}": getattr(torch, name) for name in values._FACTORIES})
    for module_name, module in list(sys.modules.items()):  # the globals torch.fx may wrap functions in
        if module_name.startswith(("timm.", "torch.nn.", "torchvision.ops")):
            state.update({f"{module_name}.{key}": value for key, value in list(vars(module).items())
                          if callable(value)})
    return state


def test_concurrent_compile_and_inspect_give_the_sequential_results():
    models = _models()
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        eager = {name: model(x) for name, model in models.items()}
    state = _process_state()
    expected = {job: _result(job, _run(job, models), x) for job in dict.fromkeys(_JOBS)}

    barrier = threading.Barrier(len(_JOBS))

    def job_in_thread(job):
        barrier.wait(timeout=60)
        return _run(job, models)

    with ThreadPoolExecutor(len(_JOBS)) as pool:
        futures = [pool.submit(job_in_thread, job) for job in _JOBS]
        made = [future.exception() or future.result() for future in futures]

    failed = {job: repr(result) for job, result in zip(_JOBS, made) if isinstance(result, BaseException)}
    assert not failed
    differ = [job for job, result in zip(_JOBS, made) if not _same(_result(job, result, x), expected[job])]
    assert not differ
    now = _process_state()
    assert [key for key, value in state.items() if now.get(key, value) is not value] == []
    for name, model in models.items():
        with torch.no_grad():
            now = model(x)
        assert isinstance(now, torch.Tensor) and torch.equal(now, eager[name]), name


class _EagerElsewhere(nn.Module):
    """Runs ``elsewhere`` in another thread, and waits for it, at the start of its forward: while it is traced, the
    other thread runs while torch.fx's replacements of ``nn.Module.__call__`` and ``__getattr__`` are in place."""

    def __init__(self, elsewhere):
        super().__init__()
        self.elsewhere = elsewhere
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward(self, x):
        thread = threading.Thread(target=self.elsewhere)
        thread.start()
        thread.join()
        return self.conv(x).relu()


def test_a_model_running_eagerly_in_another_thread_is_not_traced():
    other = timm_model("resnet10t")
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        expected = other(x)
    outputs = []

    def run_other():
        try:
            with torch.no_grad():
                outputs.append(other(x))
        except Exception as error:  # a NameError, where torch.fx's tracer took the other thread's calls
            outputs.append(error)

    extractor = fxfeat.compile(_EagerElsewhere(run_other).eval(), input_size=SIZE)
    assert len(outputs) >= 2  # traced in eval and in train mode
    assert all(isinstance(output, torch.Tensor) and torch.equal(output, expected) for output in outputs), outputs
    assert extractor.feature_info.channels() == [8]  # nothing of the other model in the graph
