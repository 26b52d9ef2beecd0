"""Reference extractors that fxfeat is compared with, in tests and benchmarks."""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.fx as fx
from torch import nn

from fxfeat.export.parity import flat_outputs as as_list  # one tensor, a list, or a dict's values

__all__ = [
    "as_list", "captured_outputs", "eager_references", "equal_maps", "load_matching_weights", "same_layout",
    "timm_feature_model", "with_identity", "without_final_linear",
]


def captured_outputs(model: nn.Module, paths, x: torch.Tensor, flows_on: bool = False) -> dict[str, list]:
    """Run ``model(x)`` with forward hooks on the modules ``paths``; each one's outputs, one per call, tensors
    cloned (a later in-place op must not reach them). With ``flows_on`` the model goes on with the recorded clone,
    so that gradients reach the model through the recorded tensors themselves (as an extractor's outputs carry
    them in train mode). Hooks are removed whatever happens."""
    records: dict[str, list] = defaultdict(list)

    def record(path: str, out):
        records[path].append(out.clone() if isinstance(out, torch.Tensor) else out)
        return records[path][-1] if flows_on else None

    handles = [model.get_submodule(path).register_forward_hook(lambda _m, _i, out, path=path: record(path, out))
               for path in dict.fromkeys(paths)]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return records


def _source_key(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """The key of ``state`` that a timm feature wrapper's parameter ``key`` comes from.

    The wrappers keep the model's own names, except that ``FeatureGetterNet`` holds the model as ``model.``,
    ``FeatureHookNet`` as ``body.``, and ``FeatureListNet``/``FeatureDictNet`` flatten the first level of a
    container (``stages.0`` is ``stages_0``).
    """
    candidates = [key, key.removeprefix("model."), key.removeprefix("body.")]
    first, _, rest = key.partition(".")
    for i, character in enumerate(first):
        if character == "_":
            candidates.append(first[:i] + "." + first[i + 1:] + ("." + rest if rest else ""))
    return next((candidate for candidate in candidates if candidate in state), None)


def load_matching_weights(target: nn.Module, source: nn.Module) -> bool:
    """Copy ``source``'s parameters and buffers into ``target`` (a timm feature wrapper of the same network).

    Returns ``False``, leaving ``target`` unchanged, if some tensor of ``target`` has no counterpart.
    """
    state = source.state_dict()
    mapped = {}
    for key, tensor in target.state_dict().items():
        origin = _source_key(key, state)
        if origin is None or state[origin].shape != tensor.shape:
            return False
        mapped[key] = state[origin]
    target.load_state_dict(mapped)
    return True


def timm_feature_model(name: str, model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """timm's own ``features_only`` model of ``name`` (with ``kwargs``, e.g. ``output_stride``), carrying the
    weights of ``model`` (an ordinary timm model of the same name), in eval mode.

    Raises:
        ValueError: a tensor of the feature model has no counterpart in ``model``.
    """
    import timm

    reference = timm.create_model(name, pretrained=False, features_only=True, **kwargs).eval()
    if not load_matching_weights(reference, model):
        raise ValueError(f"the weights of {name} do not map onto its features_only model")
    return reference


def equal_maps(reference: torch.Tensor, output: torch.Tensor) -> bool:
    """Whether ``reference`` equals ``output`` (``torch.equal``) once in its layout (:func:`same_layout`)."""
    reference = same_layout(reference, output)
    return reference.shape == output.shape and torch.equal(reference, output)


def same_layout(reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``reference`` in the layout of ``output`` where the two hold the same map in different layouts: a
    channels-last map (``N, H, W, C``) or a token sequence (``N, P + H*W, C`` with ``P`` prefix tokens, or
    ``N, C, P + H*W``) against an ``N, C, H, W`` map, or the reverse. Unchanged otherwise."""
    if reference.shape == output.shape:
        return reference
    if reference.dim() == 4 and output.dim() == 4:
        for order in ((0, 3, 1, 2), (0, 2, 3, 1)):
            if reference.permute(order).shape == output.shape:
                return reference.permute(order)
    if reference.dim() == 3 and output.dim() == 4:  # tokens, after any prefix (class, register) tokens
        batch, channels, height, width = output.shape
        prefix = reference.shape[1] - height * width
        if reference.shape[0] == batch and reference.shape[2] == channels and 0 <= prefix <= 16:
            return reference[:, prefix:].transpose(1, 2).reshape(output.shape)
        prefix = reference.shape[2] - height * width
        if reference.shape[:2] == (batch, channels) and 0 <= prefix <= 16:
            return reference[:, :, prefix:].reshape(output.shape)
    if reference.dim() == 4 and output.dim() == 3:
        batch, channels = reference.shape[:2]
        if output.shape == (batch, reference.shape[2] * reference.shape[3], channels):
            return reference.flatten(2).transpose(1, 2)
    return reference


def _interpreter_values(model: nn.Module, nodes: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Values of ``nodes`` in an interpreter run of an unmodified trace of ``model``."""
    from fxfeat.trace import trace_model

    traced = trace_model(model)
    values: dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.name in nodes:
                values[n.name] = result.clone() if isinstance(result, torch.Tensor) else result
            return result

    Recorder(traced.graph_module).run(x)
    return values


def eager_references(model: nn.Module, feature_info, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the unmodified model computes for each returned level, in output order.

    A forward hook on the level's module gives the eager value, copied when the module returns it (a later
    in-place op, such as torchvision DenseNet's ``F.relu(features, inplace=True)``, would otherwise change the
    recorded tensor); a module called more than once (or a level that is not a module output) falls back to an
    interpreter run of an unmodified trace, and so do a module returning several tensors (a list) and a level
    computed by functions after its module's output (``module_output`` false: ``torch.relu(self.down(x))``).
    """
    entries = feature_info.get_dicts()
    hooked = [entry for entry in entries if entry["module"] and entry.get("module_output", True)]
    with torch.no_grad():
        records = captured_outputs(model, [entry["module"] for entry in hooked], x)
    missing = [e["node"] for e in entries if e not in hooked or len(records[e["module"]]) != 1
               or not isinstance(records[e["module"]][0], torch.Tensor)]
    with torch.no_grad():
        fallback = _interpreter_values(model, missing, x) if missing else {}
    return [
        fallback.get(entry["node"]) if entry["node"] in missing else records[entry["module"]][0]
        for entry in entries
    ]


def with_identity(model: nn.Module, path: str) -> nn.Module:
    """A deep copy of ``model`` whose submodule ``path`` is an ``nn.Identity``: the model computing the input of
    that layer where it applied the layer (a classifier's input, as the library's own recipe for features)."""
    headless = copy.deepcopy(model)
    headless.set_submodule(path, nn.Identity())
    return headless


def without_final_linear(model: nn.Module) -> tuple[nn.Module, str | None]:
    """``model`` with its last ``nn.Linear`` in registration order made an ``nn.Identity`` (torchvision's recipe for
    the features before the classifier), and that layer's path; ``model`` itself and ``None`` where it has no
    ``nn.Linear`` (SqueezeNet's classifier is a convolution followed by a ReLU and a pooling)."""
    paths = [path for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    return (with_identity(model, paths[-1]), paths[-1]) if paths else (model, None)
