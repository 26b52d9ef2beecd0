"""Models by name, as the command line takes them: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH`` (a local
Hugging Face model directory) and ``package.module:factory``, with the library's pretrained weights, random ones,
or a local checkpoint.

Example:
    >>> from fxfeat.models import build_model
    >>> model = build_model("torchvision:resnet18", weights="random")   # seeded random weights, eval mode
    >>> type(model).__name__, model.training
    ('ResNet', False)
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

import torch
from torch import nn

from fxfeat.errors import InvalidModelError, WeightsUnavailableError

__all__ = ["LIBRARIES", "build_model", "split_spec"]

LIBRARIES = ("timm", "torchvision", "hf")


def split_spec(spec: str) -> tuple[str, str]:
    """``(library, name)`` of a model spec; ``library`` is ``"factory"`` for ``package.module:factory`` and a bare
    name is torchvision's.

    Example:
        >>> split_spec("timm:resnet50"), split_spec("resnet18"), split_spec("my_models.nets:small_cnn")
        (('timm', 'resnet50'), ('torchvision', 'resnet18'), ('factory', 'my_models.nets:small_cnn'))
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidModelError(f"A model spec is a non-empty string, not {spec!r}.",
                                hint="write timm:NAME, torchvision:NAME, hf:PATH or package.module:factory.")
    library, colon, name = spec.partition(":")
    if library in LIBRARIES and not name:
        raise InvalidModelError(f"{spec!r} names a library but no model.",
                                hint=f"write {library}:NAME, e.g. timm:resnet50 or torchvision:resnet50.")
    if not colon:
        return "torchvision", spec
    if library in LIBRARIES:
        return library, name
    return "factory", spec


def build_model(spec: str, weights: str = "random", seed: int = 0, **kwargs) -> nn.Module:
    """The model ``spec`` names, in eval mode.

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME`` (or a bare torchvision name), ``hf:PATH`` (a directory holding a
            Hugging Face ``config.json``: the base model ``transformers.AutoModel`` builds from it) or
            ``package.module:factory`` (a function returning the model, called without arguments).
        weights: ``"random"`` (seeded with ``seed``), ``"pretrained"`` (the library's weights: timm's and
            torchvision's are downloaded, ``hf:PATH`` loads the directory's, a factory returns its own), or the path
            of a checkpoint (a state dict, or a dict holding one under ``state_dict``/``model``; ``.safetensors``
            files too) loaded into the randomly built model.
        seed: the random seed for ``"random"`` weights and before loading a checkpoint.
        kwargs: arguments for the library's constructor (``timm.create_model``, ``torchvision.models.get_model``:
            ``drop_path_rate=0.1``, ``replace_stride_with_dilation=[...]``).

    Raises:
        InvalidModelError: unknown library, model name or factory.
        WeightsUnavailableError: the pretrained weights cannot be downloaded, or the checkpoint does not fit.
    """
    library, name = split_spec(spec)
    if weights not in ("random", "pretrained"):
        model = build_model(spec, "random", seed, **kwargs)
        _load_checkpoint(model, weights, spec)
        return model.eval()
    pretrained = weights == "pretrained"
    torch.manual_seed(seed)
    if library == "hf":
        model = _hf_model(name, pretrained)
    elif library == "factory":
        model = _factory(name)()
        if not isinstance(model, nn.Module):
            raise InvalidModelError(f"{name} returned {type(model).__name__}, not an nn.Module.",
                                    hint="the factory must return the model, built.")
    else:
        _check_name(library, name)
        try:
            model = _library_model(library, name, pretrained, **kwargs)
        except Exception as error:  # the library's download error: a socket, HTTP or hub error
            if not pretrained:
                raise
            raise WeightsUnavailableError(
                f"{library} could not load the pretrained weights of {name!r} ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}).",
                hint="without a network, download the checkpoint elsewhere and pass --weights PATH "
                "(weights='PATH'), or use --weights random for random weights.",
            ) from None
    return model.eval()


def _library_model(library: str, name: str, pretrained: bool, **kwargs) -> nn.Module:
    if library == "timm":
        import timm

        return timm.create_model(name, pretrained=pretrained, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)


def _check_name(library: str, name: str) -> None:
    if library == "timm":
        import timm

        known, lister = timm.list_models(), "timm.list_models()"
    else:
        import torchvision

        known, lister = torchvision.models.list_models(), "torchvision.models.list_models()"
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        raise InvalidModelError(
            f"{library} has no model named {name!r}." + (f" Close names: {', '.join(close)}." if close else ""),
            hint=f"list the names with {lister}.",
        )


def _hf_model(path: str, pretrained: bool) -> nn.Module:
    if not (Path(path) / "config.json").is_file():
        raise InvalidModelError(f"hf:{path} is not a local Hugging Face model directory (no config.json in it).",
                                hint="save one with model.save_pretrained(PATH), then pass hf:PATH.")
    import transformers

    if pretrained:
        return transformers.AutoModel.from_pretrained(path)
    return transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))


def _factory(spec: str):
    module_name, _, attribute = spec.rpartition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise InvalidModelError(f"Cannot import {module_name!r} for the model {spec!r} ({error}).",
                                hint="the module must be importable (installed, or on PYTHONPATH), or write "
                                "timm:NAME, torchvision:NAME or hf:PATH.") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InvalidModelError(f"{module_name} has no callable {attribute!r} for the model {spec!r}.",
                                hint="package.module:factory names a function returning the model.")
    return factory


def _load_checkpoint(model: nn.Module, path: str, spec: str) -> None:
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weights={path!r} is neither 'pretrained', 'random' nor a checkpoint file.",
                                      hint="pass the path of a saved state dict, or 'pretrained' / 'random'.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, not a state dict.",
                                      hint="save the weights with torch.save(model.state_dict(), PATH).")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel/DDP
        state = {key.removeprefix("module."): value for key, value in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"the checkpoint {path} does not fit {spec}: {len(result.missing_keys)} missing keys "
            f"({', '.join(result.missing_keys[:3])}...), {len(result.unexpected_keys)} unexpected "
            f"({', '.join(result.unexpected_keys[:3])}...).",
            hint="check that the checkpoint was saved from this architecture.",
        )
