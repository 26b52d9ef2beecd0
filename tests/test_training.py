"""A trainable backbone: train-mode graphs, the model's own parameters, saving and loading, freezing.

The reference everywhere is the eager model, run with forward hooks on the levels' modules, on a deep copy of the
model (the extractor shares the model's parameters and buffers, so the copy keeps the two runs apart), under the
same random seed: the extractor runs the model's ops up to the last level in the same order, so dropout and drop
path draw the same masks.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import fxfeat
from benchmarks.references import captured_outputs
from fxfeat.trace.align import align_training_graph
from tests.conftest import timm_model, torchvision_model
from tests.helpers import as_list

# name, builder arguments, input size: models with drop path / stochastic depth / dropout written in Python.
TRAINING_MODELS = [
    ("timm", "convnext_atto", dict(drop_path_rate=0.5), 64),
    ("timm", "efficientnet_b0", dict(drop_path_rate=0.5), 64),
    ("timm", "vit_tiny_patch16_224", dict(drop_path_rate=0.5, proj_drop_rate=0.2, attn_drop_rate=0.2), 224),
    ("timm", "swin_tiny_patch4_window7_224", dict(drop_path_rate=0.5), 224),
    ("torchvision", "efficientnet_b0", dict(stochastic_depth_prob=0.5), 64),
    ("torchvision", "convnext_tiny", dict(stochastic_depth_prob=0.5), 64),
    ("torchvision", "swin_t", {}, 224),  # stochastic depth 0.2, fixed by the builder
    ("torchvision", "vit_b_16", dict(dropout=0.2), 224),
]
GRADIENT_MODELS = [
    ("torchvision", "resnet50", {}, 96),
    ("torchvision", "efficientnet_b0", dict(stochastic_depth_prob=0.5), 96),
    ("torchvision", "convnext_tiny", dict(stochastic_depth_prob=0.5), 96),
    ("torchvision", "vit_b_16", dict(dropout=0.2), 224),
    ("timm", "convnext_atto", dict(drop_path_rate=0.5), 96),
    ("timm", "efficientnet_b0", dict(drop_path_rate=0.5), 96),
    ("timm", "vit_tiny_patch16_224", dict(drop_path_rate=0.5, proj_drop_rate=0.2, attn_drop_rate=0.2), 224),
]


def _model(library: str, name: str, kwargs: dict) -> nn.Module:
    return (timm_model if library == "timm" else torchvision_model)(name, **kwargs)


def _hooked_features(model: nn.Module, extractor, x: torch.Tensor) -> list[torch.Tensor]:
    """The eager model's values at the extractor's levels, laid out as the extractor returns them."""
    info = extractor.feature_info
    captured = captured_outputs(model, info.module_name(), x, flows_on=True)
    features = []
    for index in info.out_indices:
        entry, value = info[index], captured[info[index]["module"]][0]
        assert entry.get("module_output", True), f"{entry['node']} is computed after its module: no hook sees it"
        if entry["native_fmt"] == "NLC":  # tokens -> NCHW map, prefix tokens dropped (at the compile size)
            channels, height, width = entry["shape"]
            value = value[:, entry["num_prefix_tokens"]:].reshape(len(x), height, width, channels).permute(0, 3, 1, 2)
        elif entry["native_fmt"] == "NHWC" and entry["fmt"] == "NCHW":
            value = value.permute(0, 3, 1, 2)
        features.append(value)
    return features


def _loss(features: list[torch.Tensor]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return sum((f * torch.randn(f.shape, generator=generator)).sum() for f in features)


def _ids(models):
    return [f"{library}-{name}" for library, name, _, _ in models]


@pytest.mark.parametrize("library, name, kwargs, size", TRAINING_MODELS, ids=_ids(TRAINING_MODELS))
def test_training_only_ops_are_random_in_train_mode_and_off_in_eval_mode(library, name, kwargs, size):
    model = _model(library, name, kwargs)
    extractor = fxfeat.compile(model).train()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.manual_seed(1)
        first = as_list(extractor(x))
        torch.manual_seed(2)
        second = as_list(extractor(x))
        assert not torch.equal(first[-1], second[-1])  # dropout / drop path draw new masks
        extractor.eval()
        assert all(torch.equal(a, b) for a, b in zip(as_list(extractor(x)), as_list(extractor(x))))


@pytest.mark.parametrize("library, name, kwargs, size", GRADIENT_MODELS, ids=_ids(GRADIENT_MODELS))
def test_train_mode_outputs_gradients_and_batch_norm_updates_equal_eager(library, name, kwargs, size):
    model = _model(library, name, kwargs).train()
    reference = copy.deepcopy(model)
    extractor = fxfeat.compile(model)
    assert extractor.training
    x = torch.randn(2, 3, size, size)
    torch.manual_seed(3)
    features = as_list(extractor(x))
    torch.manual_seed(3)
    expected = _hooked_features(reference, extractor, x)
    assert all(torch.equal(a, b) for a, b in zip(features, expected))
    _loss(features).backward()
    _loss(expected).backward()
    reference_parameters = dict(reference.named_parameters())
    for name_, parameter in extractor.named_parameters():
        assert parameter.grad is not None, name_
        torch.testing.assert_close(parameter.grad, reference_parameters[name_].grad, rtol=0, atol=1e-6)
    reference_buffers = dict(reference.named_buffers())
    for name_, buffer in extractor.named_buffers():  # running statistics, updated as the eager model's
        assert torch.equal(buffer, reference_buffers[name_]), name_


def test_the_extractor_parameters_are_the_model_parameters():
    model = torchvision_model("resnet18")
    extractor = fxfeat.compile(model, out_indices=(1, 2, 3, 4)).train()
    model_parameters = {id(p) for p in model.parameters()}
    assert all(id(p) in model_parameters for p in extractor.parameters())
    x = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built over the model, trains the extractor
    before = [f.detach().clone() for f in extractor.eval()(x)]
    extractor.train()
    sum(f.mean() for f in extractor(x)).backward()
    optimizer.step()
    after = extractor.eval()(x)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    model.requires_grad_(False)  # freezes the extractor
    assert not any(p.requires_grad for p in extractor.parameters())
    assert not extractor.train()(x)[-1].requires_grad


def _round_trips(extractor):
    buffer = io.BytesIO()
    torch.save(extractor, buffer)
    buffer.seek(0)
    return {"pickle": pickle.loads(pickle.dumps(extractor)), "torch.save": torch.load(buffer, weights_only=False),
            "deepcopy": copy.deepcopy(extractor)}


@pytest.mark.parametrize("kwargs", [{}, {"output_stride": 16}, {"mode": "pooled", "num_classes": 7}],
                         ids=["features", "output_stride", "pooled-new-head"])
def test_extractors_pickle_save_and_deepcopy_whole(kwargs):
    model = torchvision_model("resnet18")
    extractor = fxfeat.compile(model, **kwargs).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = as_list(extractor(x))
    for how, copy_ in _round_trips(extractor).items():
        assert type(copy_).__name__ == type(extractor).__name__, how
        assert isinstance(copy_, fxfeat.FeatureGraphModule)
        assert copy_.feature_info.get_dicts() == extractor.feature_info.get_dicts(), how
        assert copy_.input_size == extractor.input_size
        assert not copy_.training
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(as_list(copy_(x)), expected)), how
        assert not any(p is q for p in copy_.parameters() for q in model.parameters())  # a copy is independent
        assert copy_.state_dict().keys() == extractor.state_dict().keys()


def test_both_graphs_survive_a_round_trip():
    model = timm_model("convnext_atto", drop_path_rate=0.5)
    extractor = fxfeat.compile(model)
    assert extractor.mode_graphs["train"] is not extractor.mode_graphs["eval"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.manual_seed(5)
        expected = extractor.train()(x)
        expected_eval = extractor.eval()(x)
    for how, copy_ in _round_trips(extractor).items():
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(copy_.eval()(x), expected_eval)), how
            torch.manual_seed(5)
            assert all(torch.equal(a, b) for a, b in zip(copy_.train()(x), expected)), how


def test_load_state_dict_takes_the_model_state_dict_and_another_extractor_s():
    source = torchvision_model("resnet18")
    target_model = torchvision_model("resnet18", num_classes=10)
    torch.nn.init.normal_(target_model.conv1.weight)
    extractor = fxfeat.compile(target_model, out_indices=(1, 2)).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = fxfeat.compile(source, out_indices=(1, 2)).eval()(x)
    result = extractor.load_state_dict(source.state_dict())  # fc (another size here), layer3 and layer4 ignored
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(a, b) for a, b in zip(extractor(x), expected))
    other = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1, 2)).eval()
    torch.nn.init.zeros_(other.get_submodule("conv1").weight)
    other.load_state_dict(extractor.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other(x), expected))
    broken = {k: v for k, v in source.state_dict().items() if not k.startswith("layer1.")}
    with pytest.raises(RuntimeError, match="Missing key"):
        extractor.load_state_dict(broken)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        extractor.load_state_dict({**source.state_dict(), "not_a_layer.weight": torch.zeros(1)})


def _norm_statistics(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer.clone() for name, buffer in module.named_buffers() if "running" in name}


def test_freeze_stops_gradients_and_norm_updates_of_the_first_levels():
    model = torchvision_model("resnet18")
    extractor = fxfeat.compile(model, out_indices=(1, 2, 3, 4))
    fxfeat.freeze(extractor, up_to=1)  # the stem (level 0) and layer1 (level 1)
    frozen = ("conv1.", "bn1.", "layer1.")
    extractor.train()
    assert not extractor.get_submodule("layer1.0.bn1").training
    assert extractor.get_submodule("layer2.0.bn1").training
    before = _norm_statistics(extractor)
    sum(f.mean() for f in extractor(torch.randn(2, 3, 64, 64))).backward()
    after = _norm_statistics(extractor)
    for name, parameter in extractor.named_parameters():
        assert (parameter.grad is None) == name.startswith(frozen), name
        assert parameter.requires_grad == (not name.startswith(frozen)), name
    for name in before:
        assert torch.equal(before[name], after[name]) == name.startswith(frozen), name
    assert not model.layer1[0].conv1.weight.requires_grad  # the parameters are the model's
    copy_ = pickle.loads(pickle.dumps(extractor)).train()  # frozen norms stay in eval mode in a copy
    assert not copy_.get_submodule("layer1.0.bn1").training


def test_freeze_with_frozen_batch_norms():
    model = torchvision_model("resnet18")
    extractor = fxfeat.compile(model, out_indices=(1, 2, 3, 4)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = extractor(x)
    fxfeat.freeze(extractor, up_to=2, norm="frozen")
    assert isinstance(extractor.get_submodule("layer2.1.bn2"), FrozenBatchNorm2d)
    assert isinstance(extractor.get_submodule("layer3.0.bn1"), nn.BatchNorm2d)
    assert isinstance(model.layer2[1].bn2, nn.BatchNorm2d)  # the model keeps its norms
    with torch.no_grad():
        for a, b in zip(extractor.train()(x)[:2], expected[:2]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    result = extractor.load_state_dict(model.state_dict())  # num_batches_tracked is dropped by the frozen norms
    assert not result.missing_keys and not result.unexpected_keys


def test_freeze_keeps_norm_subclasses_of_other_libraries_in_eval_mode():
    model = timm_model("efficientnet_b0")  # timm's BatchNormAct2d: a BatchNorm2d subclass with its own forward
    extractor = fxfeat.compile(model).train()
    assert type(extractor.get_submodule("bn1")).__name__ == "BatchNormAct2d"
    fxfeat.freeze(extractor, up_to=0, norm="frozen")
    norm = extractor.get_submodule("bn1")
    assert not isinstance(norm, FrozenBatchNorm2d) and not norm.training
    before = norm.running_mean.clone()
    extractor.train()(torch.randn(2, 3, 64, 64))
    assert torch.equal(norm.running_mean, before)
    assert extractor.get_submodule("blocks.1.0.bn1").training


class _WithBody(nn.Module):
    """A model with a submodule named ``body``, as fxfeat.backbone's wrapper has."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1))

    def forward(self, x):
        return self.body(x).mean((2, 3))


def test_freeze_takes_an_extractor_with_a_submodule_named_body():
    extractor = fxfeat.compile(_WithBody(), input_size=(3, 32, 32))
    fxfeat.freeze(extractor, up_to=0)
    assert not extractor.get_submodule("body.0").weight.requires_grad
    assert extractor.get_submodule("body.3").weight.requires_grad


def test_freeze_rejects_bad_requests():
    extractor = fxfeat.compile(torchvision_model("resnet18"), out_indices=(1, 2))
    assert fxfeat.freeze(extractor, up_to=-1) is extractor
    assert all(p.requires_grad for p in extractor.parameters())
    for kwargs, match in [(dict(up_to=5), "not a level index"), (dict(up_to=-2), "not a level index"),
                          (dict(up_to=1, norm="off"), "norm must be"), (dict(up_to=3), "not computed")]:
        with pytest.raises(fxfeat.InvalidRequestError, match=match):
            fxfeat.freeze(extractor, **kwargs)
    with pytest.raises(fxfeat.InvalidRequestError, match="made by fxfeat.compile"):
        fxfeat.freeze(torchvision_model("resnet18"), up_to=1)


class _TrainOnlyBranch(nn.Module):
    """In training, the stage's output comes from another convolution: no eval-mode level has a counterpart."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.train_stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x).relu()
        x = self.train_stage(x) if self.training else self.stage(x)
        return x.relu().mean((2, 3))


def test_an_unalignable_train_graph_falls_back_to_the_eval_graph_with_a_warning():
    model = _TrainOnlyBranch().eval()
    with pytest.warns(fxfeat.FxFeatWarning, match="runs the eval-mode graph in .train"):
        extractor = fxfeat.compile(model, input_size=(3, 32, 32))
    assert extractor.mode_graphs["train"] is extractor.mode_graphs["eval"]
    x = torch.randn(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(extractor.train()(x), extractor.eval()(x)))


class _DropBeforeAdd(nn.Module):
    """Training adds an ``add`` of its own before the block's ``add``: the match must not shift."""

    def forward(self, x):
        y = x.relu()
        if self.training:
            y = y + torch.rand_like(y)
        return (y + x).relu()


def test_alignment_skips_training_only_nodes_of_the_same_kind():
    eval_graph = torch.fx.symbolic_trace(_DropBeforeAdd().eval()).graph
    train_graph = torch.fx.symbolic_trace(_DropBeforeAdd().train()).graph
    aligned, _ = align_training_graph(eval_graph, {}, train_graph, {})
    nodes = {node.name: node for node in aligned.nodes}
    assert nodes["add"].args[0].name == "training_add"  # the eval `add` is matched with y + x, not y + noise
    assert nodes["relu_1"].args[0] is nodes["add"]


class _ShapeCheckedNet(nn.Module):
    """Traced shape-aware (Python on a size) with batch norm and dropout: training-mode tracing runs them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        if x.shape[1] != 3:
            raise ValueError("RGB only")
        x = self.act(self.norm(self.conv(x)))
        x = nn.functional.dropout(x, 0.5, self.training)  # a level stops before dropout
        return self.conv2(x).mean((2, 3))


def test_training_mode_tracing_leaves_the_model_and_the_random_state_untouched():
    model = _ShapeCheckedNet().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxfeat.FxFeatWarning)
        extractor = fxfeat.compile(model, input_size=(3, 32, 32))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.training and model.norm.training
    assert extractor.mode_graphs["train"] is not extractor.mode_graphs["eval"]
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)
    torch.manual_seed(0)
    expected = _hooked_features(reference, extractor, x)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(extractor(x), expected))


class _ConstantPerMode(nn.Module):
    """Training adds a tensor constant of its own before one both modes use: the two traces number their
    ``_tensor_constant`` attributes differently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x + torch.tensor(1.0)
        x = self.conv2(x * torch.tensor(2.0))
        return x.mean((2, 3))


def test_tensor_constants_of_each_mode_keep_their_values():
    model = _ConstantPerMode().train()
    extractor = fxfeat.compile(model, input_size=(3, 32, 32), mode="unpooled")
    assert extractor.mode_graphs["train"] is not extractor.mode_graphs["eval"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(extractor.train()(x), model.train().conv2((model.conv(x) + 1.0) * 2.0))
        assert torch.equal(extractor.eval()(x), model.eval().conv2(model.conv(x) * 2.0))
