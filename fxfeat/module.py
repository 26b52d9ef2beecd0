"""``FeatureGraphModule``: the ``torch.fx.GraphModule`` an extractor is, with its ``feature_info``.

The extractor owns its module objects (its ``train()``/``eval()``/``to()``/``half()`` never touch the user's
model) and its buffers (batch-norm statistics updated while training it stay its own). Parameters share
storage with the model, as with torchvision's ``create_feature_extractor``: nothing is copied, and weights
fine-tuned through the extractor are the model's weights. Compile ``copy.deepcopy(model)`` to keep them apart.
"""

from __future__ import annotations

import copy
from operator import attrgetter

import torch
import torch.fx as fx
from torch import nn

from fxfeat.feature_info import FeatureInfo

__all__ = ["FeatureGraphModule"]

_PRESERVED = "_user_preserved_attributes"  # GraphModule's own key for attributes deepcopy must keep


class FeatureGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose ``forward`` returns features, described by ``feature_info``.

    Attributes:
        feature_info: :class:`~fxfeat.FeatureInfo` of the returned tensors.
        input_size: ``(C, H, W)`` the extractor was compiled (probed) at; exports default to it.
    """

    # Python-side descriptions, not part of the computation: TorchScript leaves them out.
    __jit_unused_properties__ = [*getattr(fx.GraphModule, "__jit_unused_properties__", []), "feature_info",
                                 "input_size"]

    @property
    def feature_info(self) -> FeatureInfo:
        return self.meta[_PRESERVED]["feature_info"]

    @feature_info.setter
    def feature_info(self, value: FeatureInfo) -> None:
        self.meta.setdefault(_PRESERVED, {})["feature_info"] = value

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        return self.meta[_PRESERVED].get("input_size")

    @input_size.setter
    def input_size(self, value: tuple[int, int, int]) -> None:
        self.meta.setdefault(_PRESERVED, {})["input_size"] = tuple(value)

    @classmethod
    def build(
        cls,
        root: nn.Module,
        graph: fx.Graph,
        feature_info: FeatureInfo,
        training: bool,
        class_name: str,
        new_modules: dict[str, nn.Module] | None = None,
    ) -> FeatureGraphModule:
        """Make the extractor from ``graph``, keeping only the submodules and tensors it references.

        Args:
            root: the module the graph's ``call_module``/``get_attr`` targets refer to.
            graph: the rewritten graph.
            feature_info: what the outputs are.
            training: the training flag to give the extractor.
            class_name: name of the generated class.
            new_modules: modules created for the extractor (a new classifier), by target.
        """
        new_modules = new_modules or {}
        targets = {
            node.target: new_modules[node.target] if node.target in new_modules else attrgetter(node.target)(root)
            for node in graph.nodes
            if node.op in ("call_module", "get_attr")
        }
        module = cls(targets, graph, class_name)
        module.feature_info = feature_info
        _own_module_objects(module)
        module.train(training)
        return module



def _own_module_objects(module: nn.Module) -> None:
    """Replace every submodule by a shallow clone, parameters by new ``Parameter``s on the same storage and
    buffers by copies, so that nothing done to the extractor reaches the original objects."""
    clones: dict[int, object] = {}

    def own_tensor(tensor: torch.Tensor | None, is_parameter: bool):
        if tensor is None:
            return None
        if id(tensor) not in clones:
            if is_parameter:
                clones[id(tensor)] = nn.Parameter(tensor.data, requires_grad=tensor.requires_grad)
            else:
                clones[id(tensor)] = tensor.detach().clone()
        return clones[id(tensor)]

    def own(owner: nn.Module) -> None:
        owner._parameters = {k: own_tensor(v, True) for k, v in owner._parameters.items()}
        owner._buffers = {k: own_tensor(v, False) for k, v in owner._buffers.items()}
        children = {}
        for name, child in owner._modules.items():
            if child is None or id(child) in clones:
                children[name] = clones.get(id(child), child)
                continue
            clone = copy.copy(child)
            for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks"):
                if hooks in clone.__dict__:
                    setattr(clone, hooks, copy.copy(getattr(child, hooks)))
            clones[id(child)] = clone
            own(clone)
            children[name] = clone
        owner._modules = children

    own(module)
