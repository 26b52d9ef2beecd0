"""TorchScript export, by ``torch.jit.script`` or ``torch.jit.trace``, checked against eager."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from fxfeat.errors import InvalidRequestError
from fxfeat.export import parity
from fxfeat.module import FeatureGraphModule

__all__ = ["to_torchscript"]


def to_torchscript(extractor: FeatureGraphModule, method: str = "script", *, path: str | Path | None = None,
                   input_size: tuple[int, int, int] | None = None, return_report: bool = False):
    """TorchScript of ``extractor``, by ``torch.jit.script`` (``method="script"``) or ``torch.jit.trace``.

    Outputs keep their structure (a list, a dict or one tensor). A scripted extractor keeps the Python on shapes
    the model has; a traced one records the example's path through it, so where that depends on the input size
    (a window partition's padding) the report's ``dynamic`` leaves out the height and width, with a warning, and
    the traced module must be given inputs of the example's size. ``path`` saves it, with the ``feature_info``
    as an extra file :func:`read_feature_info` reads. With ``return_report``, returns ``(module, report)``.

    Raises:
        ExportError: scripting or tracing failed, or the result differs from eager.
    """
    if method not in ("script", "trace"):
        raise InvalidRequestError(f"method must be 'script' or 'trace'; got {method!r}.", hint="method='script'.")
    what = f"TorchScript ({method})"
    parity.refuse_optimized(extractor, what)
    inputs = parity.probe_inputs(extractor, input_size, dynamic=True)
    with parity.in_eval_mode(extractor), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        try:
            if method == "script":
                module = torch.jit.script(extractor)
            else:
                with torch.no_grad():  # the inference path, as eager runs it (nn.MultiheadAttention's fast path)
                    module = torch.jit.trace(extractor, inputs.example, strict=False, check_trace=False)
        except Exception as error:
            raise parity.export_error(extractor, what, error) from error

        def check(dims):
            checks = parity.compare(extractor, lambda x: parity.flat_outputs(module(x)), inputs.checked(dims), what)
            return module, checks

        module, checks, dims, notes = parity.most_dynamic(inputs, check)
    if path is not None:
        torch.jit.save(module, str(path), _extra_files={parity.FEATURE_INFO_FILE: extractor.feature_info.to_json()})
    report = parity.ExportReport("torchscript", method, tuple(parity.output_names(extractor)), dims, checks,
                                 str(path) if path else None, notes)
    return (module, report) if return_report else module
