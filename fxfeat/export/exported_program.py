"""``torch.export`` of an extractor, checked against eager, with the ``feature_info`` in the program."""

from __future__ import annotations

from pathlib import Path

import torch

from fxfeat.export import parity
from fxfeat.module import FeatureGraphModule

__all__ = ["to_exported_program"]


def to_exported_program(extractor: FeatureGraphModule, *, path: str | Path | None = None,
                        input_size: tuple[int, int, int] | None = None, dynamic: bool = True,
                        return_report: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``extractor``, with the batch, height and width dynamic where the extractor accepts
    other values and the exported program stays equal to eager there (``dynamic=False``: all fixed). The
    program's ``graph_module.meta["feature_info"]`` holds the ``feature_info``; ``path`` saves the program with
    it (``torch.export.save``; read it back with :func:`read_feature_info`). With ``return_report``, returns
    ``(program, report)``.

    Raises:
        ExportError: ``torch.export`` failed, or the program differs from eager.
    """
    inputs = parity.probe_inputs(extractor, input_size, dynamic)
    what = "torch.export"

    def attempt(dims):
        shapes = ({parity.AXES[dim]: torch.export.Dim.AUTO for dim in dims},)
        try:
            program = torch.export.export(extractor, (inputs.example,), dynamic_shapes=shapes)
        except Exception as error:
            raise parity.export_error(extractor, what, error) from error
        runnable = program.module()
        checks = parity.compare(extractor, lambda x: parity.flat_outputs(runnable(x)), inputs.checked(dims), what)
        return program, checks

    with parity.in_eval_mode(extractor):
        program, checks, dims, notes = parity.most_dynamic(inputs, attempt)
    program.graph_module.meta["feature_info"] = extractor.feature_info
    if path is not None:
        info = {parity.FEATURE_INFO_FILE: extractor.feature_info.to_json()}
        torch.export.save(program, str(path), extra_files=info)
    report = parity.ExportReport("exported_program", "torch.export", tuple(parity.output_names(extractor)), dims,
                                 checks, str(path) if path else None, notes)
    return (program, report) if return_report else program
