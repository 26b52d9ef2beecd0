"""Head features for every model: ``pooled`` (the vector before the final linear maps, or the model's own where it
ends in none), ``embedding``/``logits`` (the model's own final vector) and ``unpooled``, each against the
library's own reference on random weights: timm's ``forward_head(..., pre_logits=True)``, ``forward_features``
and ``model(x)``; torchvision's model with an ``nn.Identity`` head; Hugging Face's ``pooler_output`` and
``image_embeds``; open_clip's ``encode_image``."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import fxfeat
from tests.conftest import timm_model, torchvision_model
from tests.helpers import raises_fxfeat_error, with_zoo

# (name, constructor arguments): with the classifier timm builds, and headless (num_classes=0, timm's way to an
# embedding model). Each family ends its head differently: a pooled map, a conv_head + activation (MobileNetV3,
# GhostNet), a class token after a norm (DINOv2), an attention pool with its MLP (SigLIP), two heads on two tokens
# averaged (distilled DeiT), two heads with their own norms on one input (LeViT), prefix tokens dropped before a
# mean (EVA-02), a norm after the pooling (ConvNeXt).
TIMM_HEADS = with_zoo(
    ["resnet18", "mobilenetv3_small_050", "ghostnet_050", "deit_tiny_distilled_patch16_224", "levit_128s",
     "convnext_atto", "eva02_tiny_patch14_224", "vit_small_patch14_dinov2", "vit_base_patch16_siglip_224",
     "vit_base_patch32_clip_224.openai"],
    ["efficientnet_b0", "regnety_008", "vit_small_patch16_224", "swin_tiny_patch4_window7_224", "dpn48b",
     "nextvit_small", "xcit_nano_12_p16_224", "volo_d1_224", "cait_xxs24_224", "coat_lite_tiny", "crossvit_tiny_240",
     "pit_ti_distilled_224"],
)
# The SigLIP and CLIP towers (an attention pool; the CLIP projection as timm's 512-way head, as its .openai tag
# builds it) with two blocks instead of twelve: the same head, a sixth of the time.
SHALLOW = {"vit_base_patch16_siglip_224": {"depth": 2}, "vit_base_patch32_clip_224.openai": {"depth": 2}}


def _timm_references(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        features = model.forward_features(x)
        return {"unpooled": features, "pooled": model.forward_head(features, pre_logits=True), "embedding": model(x)}


@pytest.mark.parametrize("headless", [False, True], ids=["with-head", "headless"])
@pytest.mark.parametrize("name", TIMM_HEADS)
def test_timm_head_features_equal_timm(name, headless):
    model = timm_model(name, **SHALLOW.get(name, {}), **({"num_classes": 0} if headless else {}))
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    references = _timm_references(model, x)
    for mode, reference in references.items():
        extractor = fxfeat.compile(model, mode=mode, output_fmt="native").eval()
        with torch.no_grad():
            output = extractor(x)
        assert output.shape == reference.shape and torch.equal(output, reference), (mode, tuple(output.shape))
        if mode != "unpooled":
            assert extractor.feature_info.get_dicts()[0]["shape"] == tuple(reference.shape[1:])
            assert extractor.feature_info.channels() == [reference.shape[1]]
            assert extractor.feature_info[0]["head"] == mode
    if headless:  # a model without final linear maps: its own vector is both
        assert fxfeat.inspect(model).head.pooled == fxfeat.inspect(model).head.embedding


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050"])
def test_pooled_shape_follows_the_input_size(name):
    model = timm_model(name, num_classes=0)
    extractor = fxfeat.compile(model, mode="pooled").eval()
    for size in (160, 224, 250):
        x = torch.randn(1, 3, size, size + 32)
        with torch.no_grad():
            assert torch.equal(extractor(x), model(x))
        assert extractor(x).shape[1:] == extractor.feature_info[0]["shape"]


def _identity_head(model: nn.Module, path: str) -> nn.Module:
    headless = copy.deepcopy(model)
    parent, _, child = path.rpartition(".")
    setattr(headless.get_submodule(parent) if parent else headless, child, nn.Identity())
    return headless.eval()


@pytest.mark.parametrize("case", with_zoo(
    [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"), ("efficientnet_b0", "classifier")],
    [("convnext_tiny", "classifier.2"), ("vit_b_16", "heads.head"), ("regnet_y_400mf", "fc"),
     ("swin_t", "head"), ("densenet121", "classifier")],
))
def test_torchvision_identity_head_equals_the_model(case):
    # The usual torchvision recipe for an embedding model: the final layer replaced by nn.Identity.
    name, head = case
    model = _identity_head(torchvision_model(name), head)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
        for mode in ("pooled", "embedding"):
            assert torch.equal(fxfeat.compile(model, mode=mode).eval()(x), expected), mode
        # and with its head, pooled is the head's input: the same vector
        assert torch.equal(fxfeat.compile(torchvision_model(name), mode="pooled").eval()(x), expected)


def test_logits_is_embedding_under_the_classifier_users_name():
    model = torchvision_model("resnet18")
    x = torch.randn(2, 3, 224, 224)
    logits = fxfeat.compile(model, mode="logits").eval()
    with torch.no_grad():
        assert torch.equal(logits(x), model(x))
    assert logits.feature_info[0]["head"] == "logits" and logits.feature_info.channels() == [1000]


def test_pooled_embedding_and_a_level_from_one_pass():
    model = timm_model("deit_tiny_distilled_patch16_224")
    x = torch.randn(2, 3, 224, 224)
    extractor = fxfeat.compile(model, levels=["blocks.5", "pooled", "embedding"], return_dict=True).eval()
    references = _timm_references(model, x)
    with torch.no_grad():
        outputs = extractor(x)
        block = fxfeat.compile(model, levels=["blocks.5"]).eval()(x)[0]
    assert list(outputs) == ["blocks_5", "pooled", "embedding"]
    assert torch.equal(outputs["pooled"], references["pooled"])
    assert torch.equal(outputs["embedding"], references["embedding"])
    assert torch.equal(outputs["blocks_5"], block)
    assert [entry["head"] for entry in extractor.feature_info.get_dicts()] == [None, "pooled", "embedding"]


def test_headless_pooled_and_embedding_are_one_tensor_under_two_names():
    model = timm_model("resnet18", num_classes=0)
    extractor = fxfeat.compile(model, levels=["pooled", "embedding"]).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        pooled, embedding = extractor(x)
    assert torch.equal(pooled, model(x)) and torch.equal(embedding, model(x))


def test_distilled_heads_average_their_inputs_in_train_mode_too():
    # timm's pre_logits averages the class and distillation tokens in both modes; fxfeat replays that average in
    # the train graph as well, and a new classifier reads it.
    model = timm_model("deit_tiny_distilled_patch16_224")
    extractor = fxfeat.compile(model, mode="pooled")
    x = torch.randn(2, 3, 224, 224)
    model.train()
    extractor.train()
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(extractor(x), expected)
    torch.manual_seed(1)
    classified = fxfeat.compile(model.eval(), mode="pooled", num_classes=7).eval()
    head = classified.get_submodule("new_classifier")
    with torch.no_grad():
        assert torch.equal(classified(x), head(model.forward_head(model.forward_features(x), pre_logits=True)))


def test_replayed_pooled_survives_save_load_copy_and_torchscript():
    model = timm_model("deit_tiny_distilled_patch16_224")
    extractor = fxfeat.compile(model, mode="pooled").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = extractor(x)
        buffer = io.BytesIO()
        torch.save(extractor, buffer)
        buffer.seek(0)
        for copied in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(extractor)),
                       copy.deepcopy(extractor), fxfeat.export.to_torchscript(extractor)):
            assert torch.equal(copied(x), expected)


def test_inspect_names_where_the_head_features_come_from():
    report = fxfeat.inspect(timm_model("deit_tiny_distilled_patch16_224"))
    text = str(report)
    assert "final linear maps: head, head_dist" in text and "embedding/logits: truediv" in text
    assert "pooled is computed again without the final linear maps" in text
    resnet = str(fxfeat.inspect(torchvision_model("resnet18")))
    assert "pooled: flatten -> final linear maps: fc -> embedding/logits: fc" in resnet


class _Segmenter(nn.Module):  # returns a map: no vector per image
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.body(x)


def test_a_model_returning_maps_has_no_embedding():
    for mode in ("embedding", "logits", "pooled"):
        text = raises_fxfeat_error(fxfeat.HeadNotFoundError, fxfeat.compile, _Segmenter(), mode=mode,
                                   input_size=(3, 64, 64))
        assert "NCHW" in text and "mode='features'" in text
    text = raises_fxfeat_error(fxfeat.HeadNotFoundError, fxfeat.compile, _Segmenter(), mode="embedding",
                               input_size=(3, 64, 64))
    assert "4x32x32 per image" in text and "not one vector per image" in text


def test_a_token_model_without_pooling_has_no_embedding():
    model = timm_model("vit_tiny_patch16_224", num_classes=0, global_pool="")  # returns its tokens
    text = raises_fxfeat_error(fxfeat.HeadNotFoundError, fxfeat.compile, model, mode="embedding")
    assert "NLC tensor of shape 197x192" in text


def test_the_model_is_not_changed():
    model = timm_model("deit_tiny_distilled_patch16_224")
    state = {key: value.clone() for key, value in model.state_dict().items()}
    fxfeat.compile(model, mode="pooled")
    fxfeat.compile(model, levels=["pooled", "embedding"])
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert not model.training


def _small_vision_config(config_class, **extra):
    return config_class(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                        image_size=64, patch_size=16, **extra)


def _hf_models():
    import transformers

    return {
        "ViTModel": lambda: transformers.ViTModel(_small_vision_config(transformers.ViTConfig)),
        "CLIPVisionModelWithProjection": lambda: transformers.CLIPVisionModelWithProjection(
            _small_vision_config(transformers.CLIPVisionConfig, projection_dim=32)),
        "SiglipVisionModel": lambda: transformers.SiglipVisionModel(
            _small_vision_config(transformers.SiglipVisionConfig)),
        "Dinov2Model": lambda: transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=16)),
    }


@pytest.mark.parametrize("name", list(_hf_models()))
def test_hugging_face_pooler_and_image_embeds(name):
    # A ModelOutput's field names choose the returned vector: image_embeds where the model returns it, else
    # pooler_output. pooled is the vector before the final linear maps: the pooler output before a projection,
    # the pooler output itself where the pooler ends in an activation (ViT's dense + tanh) or an attention pool.
    model = _hf_models()[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        returned = model(pixel_values=x)
        vision = getattr(model, "vision_model", model)
        pooler = vision(pixel_values=x).pooler_output
        embedding = returned.image_embeds if "image_embeds" in returned else returned.pooler_output
        for mode, reference in (("pooled", pooler), ("embedding", embedding)):
            assert torch.equal(fxfeat.compile(model, mode=mode).eval()(x), reference), mode
        unpooled = fxfeat.compile(model, mode="unpooled", output_fmt="native").eval()(x)
        assert torch.equal(unpooled, returned.last_hidden_state)


def _open_clip_tower(arch: str) -> tuple[nn.Module, nn.Module]:
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model(arch).eval()
    return model, model.visual


@pytest.mark.parametrize("arch", with_zoo(["ViT-S-32"], ["RN50", "convnext_tiny"]))
def test_open_clip_tower_embedding_is_encode_image(arch):
    # open_clip's ViT ends in `x @ self.proj` (a parameter, not a module); its ResNet in an attention pool; its
    # ConvNeXt in a timm trunk and a linear projection.
    model, tower = _open_clip_tower(arch)
    size = tower.image_size[0] if isinstance(tower.image_size, (tuple, list)) else tower.image_size
    x = torch.randn(2, 3, size, size)
    embedding = fxfeat.compile(tower, mode="embedding").eval()
    pooled = fxfeat.compile(tower, mode="pooled").eval()
    with torch.no_grad():  # (nn.MultiheadAttention computes otherwise with gradients)
        reference = model.encode_image(x)
        assert torch.equal(embedding(x), reference)
        vector = pooled(x)
        if arch.startswith("ViT"):  # the vector the projection reads: the class token after ln_post
            assert vector.shape == (2, tower.proj.shape[0])
            assert torch.equal(vector @ tower.proj, reference)
