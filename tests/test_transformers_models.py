"""Hugging Face ``transformers`` vision models, built from small configs with random weights, compile with no
argument but the model: keyword forwards (``pixel_values=``), optional flags, ``ModelOutput`` results and Python
on shapes are traced. Their levels are the model's own hidden states (token outputs as NCHW maps), or, for models
whose stages downsample at their end (Swin, FocalNet, LeViT), each stage's map before its downsampling, as
SwinBackbone returns them; the pooled features are the base model's ``pooler_output``.

The default suite runs three of them; ``make test-zoo`` runs the rest.
"""

from __future__ import annotations

import pytest
import torch

import fxfeat
from benchmarks.references import equal_maps, same_layout
from tests.helpers import with_zoo

transformers = pytest.importorskip("transformers")
T = transformers

STAGES = dict(hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2])
VIT = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)


def _build(name: str):
    """A small random-weight model of each class."""
    builders = {
        "ResNetForImageClassification": lambda: T.ResNetForImageClassification(
            T.ResNetConfig(embedding_size=16, **STAGES)),
        "ConvNextForImageClassification": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(**STAGES)),
        "ConvNextV2ForImageClassification": lambda: T.ConvNextV2ForImageClassification(
            T.ConvNextV2Config(**STAGES)),
        "RegNetForImageClassification": lambda: T.RegNetForImageClassification(
            T.RegNetConfig(embedding_size=16, groups_width=8, **STAGES)),
        "MobileNetV2ForImageClassification": lambda: T.MobileNetV2ForImageClassification(
            T.MobileNetV2Config(depth_multiplier=0.35)),
        "PoolFormerForImageClassification": lambda: T.PoolFormerForImageClassification(
            T.PoolFormerConfig(**STAGES)),
        "SwinModel": lambda: T.SwinModel(T.SwinConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 2, 2])),
        "Swinv2Model": lambda: T.Swinv2Model(T.Swinv2Config(embed_dim=16, depths=[1, 1, 2, 1],
                                                            num_heads=[1, 1, 2, 2])),
        "FocalNetModel": lambda: T.FocalNetModel(T.FocalNetConfig(embed_dim=16, depths=[1, 1, 2, 1])),
        "PvtV2Model": lambda: T.PvtV2Model(T.PvtV2Config()),
        "SegformerModel": lambda: T.SegformerModel(T.SegformerConfig()),
        "LevitModel": lambda: T.LevitModel(T.LevitConfig()),
        "CvtModel": lambda: T.CvtModel(T.CvtConfig()),
        "ViTModel": lambda: T.ViTModel(T.ViTConfig(**VIT)),
        "DeiTModel": lambda: T.DeiTModel(T.DeiTConfig(**VIT)),
        "Dinov2Model": lambda: T.Dinov2Model(T.Dinov2Config(**VIT, image_size=224, patch_size=14)),
        "BeitModel": lambda: T.BeitModel(T.BeitConfig(**VIT)),
    }
    torch.manual_seed(0)
    return builders[name]().eval()


CI = ["ResNetForImageClassification", "SwinModel", "ViTModel"]
ZOO = ["ConvNextForImageClassification", "ConvNextV2ForImageClassification", "RegNetForImageClassification",
       "MobileNetV2ForImageClassification", "PoolFormerForImageClassification", "Swinv2Model", "FocalNetModel",
       "PvtV2Model", "SegformerModel", "LevitModel", "CvtModel", "DeiTModel", "Dinov2Model", "BeitModel"]
ISOTROPIC = {"ViTModel", "DeiTModel", "Dinov2Model", "BeitModel"}
# Stages that downsample at their end (Swin's patch merging, FocalNet's downsampling embedding, LeViT's attention
# subsample closing each stage): the levels are each stage's map before its downsampling and the last stage's
# output; the hidden states these models record are after the downsampling. Which modules downsample:
MERGING_AT_THE_END = {
    "SwinModel": lambda path, module: path.endswith(".downsample"),
    "Swinv2Model": lambda path, module: path.endswith(".downsample"),
    "FocalNetModel": lambda path, module: path.endswith(".downsample"),
    "LevitModel": lambda path, module: type(module).__name__ == "LevitAttentionSubsample",
}


def maps_before_downsampling(name: str, model, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of each downsampling module (forward pre-hooks), then the model's last hidden state."""
    found, handles = [], []
    for path, module in model.named_modules():
        if module is not None and MERGING_AT_THE_END[name](path, module):
            handles.append(module.register_forward_pre_hook(lambda m, args: found.append(args[0])))
    try:
        with torch.no_grad():
            result = model(x, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    last = (getattr(result, "reshaped_hidden_states", None) or result.hidden_states)[-1]
    return [*found, last]


def backbone_maps(model, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps of the model's ``*Backbone`` counterpart carrying its weights, every stage out, the
    backbone's own extra norms (``hidden_states_norms``) replaced by identities."""
    import copy

    config = copy.deepcopy(model.config)
    config.out_features = config.stage_names[1:]
    backbone = getattr(T, type(model).__name__.replace("Model", "Backbone"))(config).eval()
    inner = next((child for child in backbone.children() if isinstance(child, type(model))), backbone)
    missing = inner.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert not [key for key in missing if not key.startswith("hidden_states_norms")], missing
    for stage in list(getattr(backbone, "hidden_states_norms", {})):
        backbone.hidden_states_norms[stage] = torch.nn.Identity()
    with torch.no_grad():
        return list(backbone(x).feature_maps)


def check(name: str) -> None:
    model = _build(name)
    extractor = fxfeat.compile(model).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outputs = list(extractor(x))
        result = model(x, output_hidden_states=True)
    hidden = list(getattr(result, "reshaped_hidden_states", None) or result.hidden_states)
    if name in MERGING_AT_THE_END:
        hidden = [same_layout(state, output) for state, output in zip(maps_before_downsampling(name, model, x),
                                                                       outputs)]
        assert len(outputs) == len(hidden)
        if name in ("SwinModel", "Swinv2Model"):  # what SwinBackbone returns, without its extra norms
            assert all(equal_maps(a, b) for a, b in zip(backbone_maps(model, x), outputs))
    for entry, output in zip(extractor.feature_info.get_dicts(), outputs):
        if entry["reduction"] > 2:  # the models' hidden states start after their stems
            assert any(equal_maps(state, output) for state in hidden), entry
    if name in ISOTROPIC:  # the last three blocks, as timm's default for ViTs
        assert len(outputs) == 3 and len(extractor.feature_info) == model.config.num_hidden_layers
    else:  # one level per stage, the deepest one being the model's last hidden state
        assert any(equal_maps(hidden[-1], output) for output in outputs)
        reductions = extractor.feature_info.reduction()
        assert all(a < b for a, b in zip(reductions, reductions[1:])), reductions
    pooler = getattr(model.base_model(x), "pooler_output", None)
    if pooler is not None and name.endswith("ForImageClassification"):
        pooled = fxfeat.compile(model, mode="pooled").eval()
        with torch.no_grad():
            assert torch.equal(pooled(x), pooler.flatten(1))


@pytest.mark.parametrize("name", with_zoo(CI, ZOO))
def test_transformers_models(name):
    check(name)


def test_at_least_ten_classes():
    assert len(set(CI + ZOO)) >= 10


def test_a_model_configured_for_one_channel_is_probed_with_one():
    """The embeddings, kept whole, check the channel count before their convolution: the probe takes the number
    that convolution takes."""
    torch.manual_seed(0)
    model = T.ResNetModel(T.ResNetConfig(num_channels=1, embedding_size=16, **STAGES)).eval()
    extractor = fxfeat.compile(model).eval()
    assert extractor.input_size == (1, 224, 224)
    x = torch.randn(2, 1, 96, 128)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        assert equal_maps(hidden[-1], list(extractor(x))[-1])


def test_the_probe_size_comes_from_the_config():
    """A ViT built for 64x64 one-channel images (its position embeddings fix the size) compiles with no input_size:
    ``config.image_size`` and ``config.num_channels`` declare it, as timm's ``pretrained_cfg`` does."""
    torch.manual_seed(0)
    model = T.ViTModel(T.ViTConfig(**VIT, image_size=64, num_channels=1)).eval()
    extractor = fxfeat.compile(model).eval()
    assert extractor.input_size == (1, 64, 64) and extractor.feature_info.reduction() == [16, 16, 16]
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states
        assert torch.equal(hidden[-1][:, 1:].transpose(1, 2).reshape(2, 64, 4, 4), list(extractor(x))[-1])
