"""What model libraries declare untraceable: timm's registry of layers torch.fx should keep whole."""

from __future__ import annotations

import sys

__all__ = ["READ_LIBRARY_REGISTRIES", "library_notrace_hints"]

READ_LIBRARY_REGISTRIES = True  # False: ignore the registries below (``make coverage`` measures what they are worth)


def library_notrace_hints() -> tuple[tuple[type, ...], tuple]:
    """Modules and functions a model library already loaded declares as not traceable.

    timm keeps such a registry for its own layers (``timm.layers._fx``); honouring it keeps "same"-padding
    convolutions and similar layers whole. Registered *blocks* (modules holding convolutions or linear layers)
    are still traced through, falling back to opaque if they fail: their insides hold levels and strides, and
    some are registered only for a torch.fx issue fxfeat handles (in-place ops). The registry is only read if
    the model's library imported it.
    """
    registry = sys.modules.get("timm.layers._fx")
    if registry is None or not READ_LIBRARY_REGISTRIES:
        return (), ()
    modules = tuple(getattr(registry, "get_notrace_modules", list)())
    functions = tuple(getattr(registry, "get_notrace_functions", list)())
    return modules, functions
