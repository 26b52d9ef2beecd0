"""``FeatureInfo``: what each output of an extractor is, in timm's schema plus fxfeat's own fields.

Each entry is a dict with timm's keys ``num_chs``, ``reduction``, ``module`` (so heads written for timm work
unchanged) and fxfeat's ``node`` (fx node name), ``fmt`` (layout of the returned tensor, e.g. ``"NCHW"``),
``native_fmt`` (the layout the model computes it in: ``"NHWC"`` maps and ``"NLC"`` tokens are permuted or reshaped
to ``fmt`` unless ``output_fmt="native"``), ``num_prefix_tokens`` (class and register tokens dropped from a token
sequence), ``module_output`` (``False`` when the level is element-wise functions applied to ``module``'s output
between module calls, ``torch.relu(self.down(x))``), ``head`` (which head feature the entry is: ``"unpooled"``,
``"pooled"``, ``"embedding"`` or ``"logits"``; ``None`` for a pyramid level), ``shape`` (per-sample shape of the
returned tensor at the probe size, batch dimension left out) and ``index``.

Like timm's class, ``len()`` and ``[i]`` cover every level the model has, while the accessors
(``channels()``, ``reduction()``, ...) default to the selected ``out_indices``.

Example:
    >>> from fxfeat import FeatureInfo
    >>> info = FeatureInfo(
    ...     [dict(num_chs=64, reduction=2, module="act1"), dict(num_chs=256, reduction=4, module="layer1")],
    ...     out_indices=(1,),
    ... )
    >>> info.channels(), info.reduction(), info.module_name(), len(info)
    ([256], [4], ['layer1'], 2)
    >>> info.channels(idx=0)
    64
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["FeatureInfo"]

IndexArg = int | Sequence[int] | None


class FeatureInfo:
    """Describes every level of a model and which of them an extractor returns.

    Args:
        info: one dict per level, in level order.
        out_indices: indices (into ``info``) of the levels the extractor returns, in output order.
    """

    def __init__(self, info: Sequence[dict[str, Any]], out_indices: Sequence[int]):
        self.info = [dict(entry, index=entry.get("index", i)) for i, entry in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: IndexArg = None) -> Any:
        """Value of ``key`` for each returned level (``idx=None``), one level (int) or several (list)."""
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: IndexArg = None) -> Any:
        """The info dicts (restricted to ``keys`` if given) of the returned levels, or of ``idx``."""

        def select(i: int) -> dict[str, Any]:
            entry = self.info[i]
            return dict(entry) if keys is None else {k: entry[k] for k in keys}

        if idx is None:
            return [select(i) for i in self.out_indices]
        if isinstance(idx, Sequence):
            return [select(i) for i in idx]
        return select(idx)

    def channels(self, idx: IndexArg = None) -> Any:
        """Number of channels of each returned level."""
        return self.get("num_chs", idx)

    def reduction(self, idx: IndexArg = None) -> Any:
        """Spatial reduction (stride relative to the input) of each returned level."""
        return self.get("reduction", idx)

    def module_name(self, idx: IndexArg = None) -> Any:
        """Path of the module whose output each returned level is."""
        return self.get("module", idx)

    def from_other(self, out_indices: Sequence[int]) -> FeatureInfo:
        """The same levels with another selection."""
        return FeatureInfo(self.info, out_indices)

    def to_json(self) -> str:
        """The levels and the selection as JSON (shapes become lists), as stored in exported files.

        Example:
            >>> info = FeatureInfo([dict(num_chs=8, reduction=2, module="stem", shape=(8, 4, 4))], out_indices=(0,))
            >>> FeatureInfo.from_json(info.to_json()).get_dicts()[0]["shape"]
            (8, 4, 4)
        """
        return json.dumps(dict(info=self.info, out_indices=list(self.out_indices)))

    @classmethod
    def from_json(cls, text: str) -> FeatureInfo:
        """Read what :meth:`to_json` wrote."""
        data = json.loads(text)
        info = [{k: tuple(v) if k == "shape" and v is not None else v for k, v in entry.items()}
                for entry in data["info"]]
        return cls(info, data["out_indices"])

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()}, out_indices={self.out_indices})"
