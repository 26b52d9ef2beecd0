"""Reference extractors that fxfeat is compared with, in tests and benchmarks."""

from __future__ import annotations

import torch


def timm_feature_model(name: str, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """timm's own ``features_only`` model of ``name`` (with ``kwargs``, e.g. ``output_stride``), carrying the
    weights of ``model`` (an ordinary timm model of the same name), in eval mode."""
    import timm

    reference = timm.create_model(name, pretrained=False, features_only=True, **kwargs).eval()
    state = model.state_dict()

    def source(key: str) -> str:  # features_only flattens the first level: "stages_0.x" is "stages.0.x"
        if key in state:
            return key
        first, _, rest = key.partition(".")
        return first.replace("_", ".", 1) + ("." + rest if rest else "")

    reference.load_state_dict({key: state[source(key)] for key in reference.state_dict()})
    return reference
