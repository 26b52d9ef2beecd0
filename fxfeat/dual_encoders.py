"""The image side of a Hugging Face dual encoder (an image and a text tower trained together: CLIP, SigLIP, ALIGN,
AltCLIP...), as one module that takes an image batch.

A model is a dual encoder when its config has a ``vision_config`` and the model has ``get_image_features``. Which
of its modules make the image side is not looked up in a table: :func:`image_side` runs ``get_image_features`` once
on an example batch and watches which of the model's own children it calls, in order: the first, given the pixels,
is the vision tower; those after it, each applied to what the one before returned (the first to the tower's
``pooler_output``), are the projection. The image side keeps those modules under their own names, so its state
dict is the image half of the whole model's (``vision_model.*``, ``visual_projection.*``), and returns what they
compute as a dict: ``image_embeds`` (the projected vector, before the L2 normalisation ``CLIPModel.forward``
applies), ``pooler_output`` (the tower's pooled vector, the projection's input) and ``last_hidden_state``.

Example:
    >>> import torch, transformers
    >>> tower = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...              intermediate_size=64)
    >>> text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    >>> clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=tower, text_config=text,
    ...                                                       projection_dim=24)).eval()
    >>> side = image_side(clip)
    >>> side.tower, side.projection
    ('vision_model', ('visual_projection',))
    >>> {name: tuple(value.shape) for name, value in side(torch.randn(2, 3, 32, 32)).items()}
    {'image_embeds': (2, 24), 'pooler_output': (2, 32), 'last_hidden_state': (2, 17, 32)}
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from fxfeat.errors import InvalidModelError

__all__ = ["ImageSide", "image_side", "is_dual_encoder"]


def is_dual_encoder(model: nn.Module) -> bool:
    """Whether ``model`` pairs an image tower with another one: its config has a ``vision_config`` and the model
    has ``get_image_features``."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and callable(getattr(model, "get_image_features", None))


class ImageSide(nn.Module):
    """The vision tower and projection of a dual encoder, under the names the whole model gives them.

    Attributes:
        tower: the name of the vision tower (a child module).
        projection: the names of the modules applied to the tower's ``pooler_output``, in order (empty: none).
        config: the dual encoder's ``vision_config`` (``image_size`` and ``num_channels`` give the input size),
            naming the directory the whole model came from.
    """

    def __init__(self, modules: dict[str, nn.Module], tower: str, projection: tuple[str, ...],
                 tower_arguments: dict[str, Any], config: Any):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self.tower, self.projection, self.config = tower, projection, config
        self._tower_arguments = dict(tower_arguments)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = getattr(self, self.tower)(pixel_values=pixel_values, **self._tower_arguments)
        pooled = _pooler_output(outputs)
        embeds = pooled
        for name in self.projection:
            embeds = getattr(self, name)(embeds)
        return {"image_embeds": embeds, "pooler_output": pooled, "last_hidden_state": _last_hidden_state(outputs)}

    def own_entries(self, state: dict[str, Any]) -> dict[str, Any]:
        """The entries of a whole dual encoder's state dict that belong to the image side (the text tower's and
        the temperature's left out)."""
        names = set(dict(self.named_children()))
        return {key: value for key, value in state.items() if key.split(".", 1)[0] in names}


def _snapshot(output: Any) -> Any:
    """The fields of a module's output as they are now (CLIP's ``get_image_features`` writes its projection into
    the tower's output afterwards)."""
    return dict(output) if isinstance(output, dict) else output


def _pooler_output(outputs: Any) -> Any:
    return outputs["pooler_output"] if isinstance(outputs, dict) else outputs[1]


def _last_hidden_state(outputs: Any) -> Any:
    return outputs["last_hidden_state"] if isinstance(outputs, dict) else outputs[0]


def image_side(model: nn.Module) -> ImageSide:
    """The image side of the dual encoder ``model`` (in eval mode), found by running its ``get_image_features``
    on an example batch (see the module docstring); it shares the model's modules.

    Raises:
        InvalidModelError: ``get_image_features`` does not run on an image batch, or does more than a tower and a
            projection of its pooled output.
    """
    config = model.config.vision_config
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    example = torch.zeros(1, getattr(config, "num_channels", 3), height, width)
    children = dict(model.named_children())
    calls: list[tuple[str, tuple, dict, Any]] = []
    handles = [module.register_forward_hook(
        lambda module, args, kwargs, output, name=name: calls.append((name, args, kwargs, _snapshot(output))),
        with_kwargs=True)
        for name, module in children.items()]
    name = type(model).__name__
    try:
        with torch.no_grad():
            result = model.eval().get_image_features(pixel_values=example)
    except Exception as error:
        raise InvalidModelError(
            f"{name}.get_image_features does not run on an image batch of shape {tuple(example.shape)} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}).",
            hint="fxfeat takes the image side of dual encoders whose image features are computed from "
            "pixel_values alone; build the vision model yourself and pass it as an nn.Module.") from None
    finally:
        for handle in handles:
            handle.remove()
    tower, tower_arguments, value, projection = _read_calls(calls, example, name)
    final = result if isinstance(result, torch.Tensor) else _pooler_output(result)
    if final is not value:
        raise InvalidModelError(f"{name}.get_image_features returns something other than its projection of the "
                                "vision tower's pooled output.",
                                hint="build the image side yourself and pass it as an nn.Module.")
    modules = {child: children[child] for child in (tower, *projection)}
    config = copy.deepcopy(config)
    config._name_or_path = getattr(model.config, "_name_or_path", "")
    return ImageSide(modules, tower, projection, tower_arguments, config).eval()


def _read_calls(calls: list[tuple[str, tuple, dict, Any]], example: torch.Tensor, name: str,
                ) -> tuple[str, dict[str, Any], torch.Tensor, tuple[str, ...]]:
    """The tower's name and other arguments, the last value computed and the projection's module names, from the
    children's calls in order."""
    if not calls or not any(value is example for value in (*calls[0][1], *calls[0][2].values())):
        raise InvalidModelError(f"{name}.get_image_features does not pass the pixels to a module of its own first.",
                                hint="build the image side yourself and pass it as an nn.Module.")
    tower, args, kwargs, outputs = calls[0]
    others = {key: value for key, value in kwargs.items() if value is not example}
    if args or any(isinstance(value, torch.Tensor) for value in others.values()):
        raise InvalidModelError(f"{name}.get_image_features gives its vision tower ({tower}) more than the pixels.",
                                hint="build the image side yourself and pass it as an nn.Module.")
    value, projection = _pooler_output(outputs), []
    for child, child_args, child_kwargs, output in calls[1:]:
        inputs = (*child_args, *child_kwargs.values())
        if len(inputs) != 1 or inputs[0] is not value:
            raise InvalidModelError(f"{name}.get_image_features applies {child} to something other than the "
                                    "vision tower's pooled output or its projection.",
                                    hint="build the image side yourself and pass it as an nn.Module.")
        value = output
        projection.append(child)
    return tower, others, value, tuple(projection)
