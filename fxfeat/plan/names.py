"""The one rule that names an extractor's outputs, wherever they get a name: the keys of ``return_dict=True`` (the
plan), the outputs of an exported model (``fxfeat.export``) and the folders of an extraction (``fxfeat.extract``).

A level is labelled by the key the model returns it under or the head feature it is (``pooled``...), else its
module path, else its fx node name. Its name is the label with ``.`` and every character other than an ASCII
letter, a digit, ``_`` or ``-`` replaced by ``_`` (a module path ``layer3.0`` is ``layer3_0``; a model's own
key ``0`` stays ``0``): a dict key, an ONNX output name and a folder name alike. Among the outputs of one
extractor a name already taken (by an earlier output, or reserved by the caller: an extraction's ``metadata``
folder) gives way to the level's node name, and where that is taken too to the name followed by ``_1``, ``_2``...

Example:
    >>> output_name("layer3.0"), output_name("stage 1/conv"), output_name("0")
    ('layer3_0', 'stage_1_conv', '0')
    >>> output_names(["layer1", "layer1", "layer1"], fallbacks=["add", "add_1", "add_1"])
    ['layer1', 'add_1', 'layer1_1']
    >>> output_names(["metadata", "pooled"], reserved=("metadata",))
    ['metadata_1', 'pooled']
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["entry_label", "output_name", "output_names"]


def output_name(label: str) -> str:
    """The name of an output labelled ``label`` (a dict key, a module path, a node name): ``.`` and every
    character other than an ASCII letter, digit, ``_`` or ``-`` become ``_``; an empty label is ``output``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(label)) or "output"


def output_names(labels: Sequence[str], fallbacks: Sequence[str | None] | None = None,
                 reserved: Iterable[str] = ()) -> list[str]:
    """The names of one extractor's outputs, in order, all different: each label's :func:`output_name`; one
    already taken (or ``reserved``) takes its fallback's name (the level's node), then ``_1``, ``_2``... after it."""
    taken = set(reserved)
    names = []
    for index, label in enumerate(labels):
        name = output_name(label)
        fallback = fallbacks[index] if fallbacks is not None else None
        if name in taken and fallback:
            name = output_name(fallback)
        if name in taken:
            stem, count = output_name(label), 1
            while f"{stem}_{count}" in taken:
                count += 1
            name = f"{stem}_{count}"
        taken.add(name)
        names.append(name)
    return names


def entry_label(entry: Mapping[str, Any]) -> str:
    """The label of a ``feature_info`` entry: the head feature it is, else its module path, else its node."""
    return entry.get("head") or entry.get("module") or entry["node"]
