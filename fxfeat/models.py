"""Models by name, as the command line takes them: ``timm:NAME``, ``torchvision:NAME``, ``hf:PATH`` (a local
Hugging Face model directory; a dual encoder gives its image side), ``open_clip:ARCH[/TAG]`` (the image tower) and
``package.module:factory``, with the library's pretrained weights, random ones, or a local checkpoint.

Example:
    >>> from fxfeat.models import build_model
    >>> model = build_model("torchvision:resnet18", weights="random")   # seeded random weights, eval mode
    >>> type(model).__name__, model.training
    ('ResNet', False)
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fxfeat.dual_encoders import ImageSide, image_side, is_dual_encoder
from fxfeat.errors import InvalidModelError, MissingDependencyError, WeightsUnavailableError

__all__ = ["LIBRARIES", "build_model", "split_spec"]

LIBRARIES = ("timm", "torchvision", "hf", "open_clip")


def split_spec(spec: str) -> tuple[str, str]:
    """``(library, name)`` of a model spec; ``library`` is ``"factory"`` for ``package.module:factory`` and a bare
    name is torchvision's.

    Example:
        >>> split_spec("timm:resnet50"), split_spec("resnet18"), split_spec("my_models.nets:small_cnn")
        (('timm', 'resnet50'), ('torchvision', 'resnet18'), ('factory', 'my_models.nets:small_cnn'))
        >>> split_spec("open_clip:ViT-B-32/laion2b_s34b_b79k")
        ('open_clip', 'ViT-B-32/laion2b_s34b_b79k')
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidModelError(f"A model spec is a non-empty string, not {spec!r}.",
                                hint="write timm:NAME, torchvision:NAME, hf:PATH, open_clip:ARCH[/TAG] or "
                                "package.module:factory.")
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
            Hugging Face ``config.json``: the base model ``transformers.AutoModel`` builds from it, or the image side
            of a dual encoder, :mod:`fxfeat.dual_encoders`), ``open_clip:ARCH`` or ``open_clip:ARCH/TAG`` (the
            image tower ``model.visual`` of open_clip's model: its forward is ``encode_image`` without the
            normalisation; the tag's preprocessing is kept) or ``package.module:factory`` (a function returning the
            model, called without arguments).
        weights: ``"random"`` (seeded with ``seed``), ``"pretrained"`` (the library's weights: timm's,
            torchvision's and an open_clip tag's are downloaded, ``hf:PATH`` loads the directory's, a factory
            returns its own), or the path of a checkpoint (a state dict, or a dict holding one under
            ``state_dict``/``model``; ``.safetensors`` files too) loaded into the randomly built model; the
            checkpoint of a whole dual encoder loads into its image side (open_clip's ``visual.*`` entries, a
            Hugging Face model's vision tower and projection; the text tower's are ignored).
        seed: the random seed for ``"random"`` weights and before loading a checkpoint.
        kwargs: arguments for the library's constructor (``timm.create_model``, ``torchvision.models.get_model``,
            ``open_clip.create_model``: ``drop_path_rate=0.1``, ``replace_stride_with_dilation=[...]``).

    Raises:
        InvalidModelError: unknown library, model name, open_clip tag or factory.
        WeightsUnavailableError: the pretrained weights cannot be downloaded, or the checkpoint does not fit.
    """
    library, name = split_spec(spec)
    if weights not in ("random", "pretrained"):
        model = build_model(spec, "random", seed, **kwargs)
        _load_checkpoint(model, weights, spec, _own_entries(library, model))
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
        _check_name(library, name, pretrained)
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
    if library == "open_clip":
        return _open_clip_tower(name, pretrained, **kwargs)
    import torchvision

    return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kwargs)


def _open_clip_tower(name: str, pretrained: bool, **kwargs) -> nn.Module:
    """open_clip's image tower; with a tag, built with the tag's preprocessing (downloaded only if
    ``pretrained``)."""
    open_clip = _import_open_clip()

    arch, _, tag = name.partition("/")
    if pretrained:
        return open_clip.create_model(arch, pretrained=tag, pretrained_text=False, **kwargs).visual
    preprocess = {key: value for key, value in (open_clip.get_pretrained_cfg(arch, tag) if tag else {}).items()
                  if key != "size"}  # open_clip keeps only the preprocessing keys; the size is the tower's
    preprocess.update(kwargs.pop("force_preprocess_cfg", None) or {})
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "initialized randomly": said of every model before its checkpoint loads
    try:
        model = open_clip.create_model(arch, pretrained_text=False, force_preprocess_cfg=preprocess, **kwargs)
    finally:
        logging.disable(previous)
    return model.visual


def _check_name(library: str, name: str, pretrained: bool) -> None:
    if library == "timm":
        import timm

        architecture, dot, _ = name.partition(".")  # timm's NAME.TAG: an architecture and its pretrained tag
        _check_known(library, architecture, timm.list_models(), "timm.list_models()")
        if dot:
            _check_known(library, name, timm.list_pretrained(f"{architecture}.*"),
                         f"timm.list_pretrained('{architecture}.*')", what="pretrained tag")
        return
    if library == "open_clip":
        _check_open_clip_name(name, pretrained)
        return
    import torchvision

    _check_known(library, name, torchvision.models.list_models(), "torchvision.models.list_models()")


def _check_known(library: str, name: str, known: list[str], lister: str, what: str = "model") -> None:
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        raise InvalidModelError(
            f"{library} has no {what} named {name!r}." + (f" Close names: {', '.join(close)}." if close else ""),
            hint=f"list the names with {lister}.",
        )


def _import_open_clip():
    try:
        import open_clip
    except ImportError:
        raise MissingDependencyError("open_clip:ARCH models are built by open_clip, which is not installed.",
                                     hint="pip install open_clip_torch") from None
    return open_clip


def _check_open_clip_name(name: str, pretrained: bool) -> None:
    open_clip = _import_open_clip()

    arch, _, tag = name.partition("/")
    _check_known("open_clip", arch, open_clip.list_models(), "open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag:
        _check_known("open_clip", tag, tags, f"open_clip.list_pretrained_tags_by_model({arch!r})",
                     what=f"pretrained tag for {arch}")
    elif pretrained:
        raise InvalidModelError(
            f"open_clip:{arch} names no pretrained tag, so there are no weights to download.",
            hint=f"write open_clip:{arch}/TAG" + (f" with one of its tags ({', '.join(tags[:6])}"
                                                  f"{', ...' if len(tags) > 6 else ''})" if tags else "")
            + ", or pass --weights PATH (weights='PATH') or --weights random.")


def _hf_model(path: str, pretrained: bool) -> nn.Module:
    if not (Path(path) / "config.json").is_file():
        raise InvalidModelError(f"hf:{path} is not a local Hugging Face model directory (no config.json in it).",
                                hint="save one with model.save_pretrained(PATH), then pass hf:PATH.")
    import transformers

    if pretrained:
        model = transformers.AutoModel.from_pretrained(path)
    else:
        model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(path))
    return image_side(model) if is_dual_encoder(model) else model


def _own_entries(library: str, model: nn.Module) -> Callable[[dict], dict] | None:
    """How the checkpoint of a whole dual encoder is read into its image side (``None``: a checkpoint of the model
    itself)."""
    if isinstance(model, ImageSide):
        return model.own_entries
    if library == "open_clip":
        return _open_clip_tower_entries
    return None


def _open_clip_tower_entries(state: dict) -> dict:
    """A whole open_clip model's entries of its image tower (``visual.*``), named as the tower names them; a
    checkpoint of the tower alone as it is."""
    if not any(key.startswith("visual.") for key in state):
        return state
    return {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}


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


def _load_checkpoint(model: nn.Module, path: str, spec: str, own_entries: Callable[[dict], dict] | None) -> None:
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"weights={path!r} is neither 'pretrained', 'random' nor a checkpoint file.",
                                      hint="pass the path of a saved state dict, or 'pretrained' / 'random'.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # not a checkpoint, or one holding more than tensors (a TorchScript archive)
        with open(path, "rb") as handle:
            head = handle.read(48)
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        text = head.decode("utf-8", errors="ignore")
        if path.endswith(".safetensors"):
            holds = f"no tensors safetensors reads ({type(error).__name__}: {reason})"
        elif head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip archive, a pickle: of more than tensors
            holds = f"a checkpoint torch.load(weights_only=True) refuses ({type(error).__name__}: {reason})"
        elif not head:
            holds = "nothing: it is empty"
        elif b"\0" not in head and text.strip() and all(char.isprintable() or char in "\t\r\n" for char in text):
            holds = f"text, not a checkpoint (it begins {text.strip().splitlines()[0][:40]!r})"
        else:
            holds = f"bytes that are not a checkpoint (it begins {head[:8].hex(' ')}: neither torch's zip archive " \
                    "nor a pickle)"
        raise WeightsUnavailableError(f"cannot read the checkpoint {path}: it holds {holds}.",
                                      hint="--weights takes a state dict saved with torch.save(model.state_dict(), "
                                      "PATH) (or a .safetensors file), 'pretrained' or 'random'.") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} holds a {type(state).__name__}, not a state dict.",
                                      hint="save the weights with torch.save(model.state_dict(), PATH).")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel/DDP
        state = {key.removeprefix("module."): value for key, value in state.items()}
    if own_entries is not None:
        state = own_entries(state)
    expected = model.state_dict()
    reshaped = [f"{key}: {tuple(value.shape)} in the checkpoint, {tuple(expected[key].shape)} in the model"
                for key, value in state.items() if isinstance(value, torch.Tensor)
                and isinstance(expected.get(key), torch.Tensor) and value.shape != expected[key].shape]
    result = model.load_state_dict(state, strict=False) if not reshaped else None
    missing = [key for key in expected if key not in state] if result is None else result.missing_keys
    unexpected = [key for key in state if key not in expected] if result is None else result.unexpected_keys
    if missing or unexpected or reshaped:
        raise WeightsUnavailableError(
            f"the checkpoint {path} does not fit {spec}: {len(missing)} missing keys ({', '.join(missing[:3])}...), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}...), {len(reshaped)} of another shape"
            + (f" ({reshaped[0]}, ...)." if reshaped else "."),
            hint="check that the checkpoint was saved from this architecture.",
        )
