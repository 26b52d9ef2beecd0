"""Token models: a ViT's blocks as levels, prefix tokens dropped, token grids returned as NCHW maps, and
hierarchical token pyramids (PiT, LeViT, MViTv2, Twins, CoaT...) level by level.

The default suite runs a representative subset; ``make test-zoo`` runs the rest.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxfeat
from benchmarks.coverage_check import compare_levels, randomise_inert_weights
from benchmarks.references import timm_feature_model
from tests.conftest import timm_model, torchvision_model
from tests.helpers import as_list, assert_bit_equal_to_eager, with_zoo

# (model, input size, create_model kwargs, three block indices, a second size the model accepts or None, the
# prefix tokens its blocks see).
ISOTROPIC = [
    ("vit_tiny_patch16_224", 224, {}, (2, 5, 11), None, 1),
    ("deit_tiny_distilled_patch16_224", 224, {}, (0, 6, 11), None, 2),  # class and distillation tokens
    ("xcit_nano_12_p16_224", 224, {}, (1, 5, 11), (160, 288), 0),  # any multiple of 16; class token added later
    ("vit_tiny_patch16_224", 224, dict(dynamic_img_size=True), (9, 10, 11), (160, 256), 1),  # resampled positions
]
ISOTROPIC_ZOO = [
    ("vit_small_patch14_reg4_dinov2", 224, dict(img_size=224), (3, 7, 11), None, 5),  # 4 registers, patch 14
    ("eva02_tiny_patch14_224", 224, {}, (1, 5, 11), None, 1),
    ("cait_xxs24_224", 224, {}, (3, 10, 23), None, 0),  # class-attention blocks after the grid blocks
    ("flexivit_small", 240, {}, (2, 5, 11), None, 1),
    ("beit_base_patch16_224", 224, {}, (2, 5, 11), None, 1),
]
HIERARCHICAL = ["pit_ti_224", "levit_128s", "twins_pcpvt_small"]
HIERARCHICAL_ZOO = [
    "mvitv2_tiny", "coat_lite_tiny",
    # Already worked before token levels existed: they must keep working.
    "swin_tiny_patch4_window7_224", "pvt_v2_b0", "nest_tiny", "tiny_vit_5m_224", "efficientvit_b0",
]


def check_isotropic(name, size, kwargs, indices, second_size, prefix) -> None:
    model = timm_model(name, **kwargs)
    extractor = fxfeat.compile(model, levels="auto", out_indices=indices, input_size=(3, size, size)).eval()
    info = extractor.feature_info
    blocks = len(model.blocks)
    assert len(info) == blocks and [entry["module"] for entry in info.info] == [f"blocks.{i}" for i in range(blocks)]
    patch = model.patch_embed.patch_size
    assert set(info.reduction(idx=list(range(blocks)))) == {patch if isinstance(patch, int) else patch[0]}
    assert set(info.channels(idx=list(range(blocks)))) == {model.embed_dim}
    assert {entry["native_fmt"] for entry in info.info} == {"NLC"}
    assert {entry["num_prefix_tokens"] for entry in info.info} == {prefix}
    sizes = [(size, size)] + ([second_size] if second_size else [])
    for height, width in sizes:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            outputs = extractor(x)
            expected = model.forward_intermediates(x, indices=list(indices), output_fmt="NCHW",
                                                   intermediates_only=True)
        assert len(outputs) == len(expected) == 3
        for output, reference in zip(outputs, expected):
            assert output.shape == reference.shape and torch.equal(output, reference)
    for entry, output in zip(info.get_dicts(), as_list(extractor(torch.randn(1, 3, size, size)))):
        assert entry["fmt"] == "NCHW" and tuple(output.shape[1:]) == entry["shape"]
    # The grid is read at run time from a map of the model (the patch embedding's, or one a block makes of the
    # tokens), not from the probe.
    sources = [node.args[0] for node in extractor.graph.nodes if node.op == "call_method" and node.target == "size"
               and node.args[1] in (2, 3) and node.args[0].op == "call_module"]
    assert sources, extractor.code


@pytest.mark.parametrize("name, size, kwargs, indices, second_size, prefix", ISOTROPIC)
def test_isotropic_blocks_equal_timm_forward_intermediates(name, size, kwargs, indices, second_size, prefix):
    check_isotropic(name, size, kwargs, indices, second_size, prefix)


@pytest.mark.zoo
@pytest.mark.parametrize("name, size, kwargs, indices, second_size, prefix", ISOTROPIC_ZOO)
def test_isotropic_zoo(name, size, kwargs, indices, second_size, prefix):
    check_isotropic(name, size, kwargs, indices, second_size, prefix)


def test_isotropic_default_out_indices_follow_timm():
    model = timm_model("vit_tiny_patch16_224")
    timm_default = timm_model("vit_tiny_patch16_224", features_only=True).feature_info.out_indices
    assert fxfeat.compile(model).feature_info.out_indices == tuple(timm_default)
    assert fxfeat.compile(model, levels="auto").feature_info.out_indices == tuple(timm_default)


def test_declared_vit_levels_are_maps_without_the_class_token():
    # The declared feature_info names the blocks; their token outputs come back as NCHW maps.
    model = timm_model("vit_tiny_patch16_224")
    extractor = fxfeat.compile(model, out_indices=(1, 4)).eval()
    assert extractor.feature_info.module_name() == ["blocks.1", "blocks.4"]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[1, 4], output_fmt="NCHW", intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(extractor(x), expected))


def test_native_output_fmt_returns_the_tokens_as_computed():
    model = timm_model("deit_tiny_distilled_patch16_224")
    extractor = fxfeat.compile(model, levels="auto", out_indices=(3,), output_fmt="native").eval()
    entry = extractor.feature_info.get_dicts()[0]
    assert (entry["fmt"], entry["native_fmt"], entry["num_prefix_tokens"], entry["shape"]) == ("NLC", "NLC", 2,
                                                                                              (198, 192))
    x = torch.randn(1, 3, 224, 224)
    recorded = []
    handle = model.blocks[3].register_forward_hook(lambda m, i, o: recorded.append(o))
    with torch.no_grad():
        model(x)
        (tokens,) = extractor(x)
    handle.remove()
    assert torch.equal(tokens, recorded[0])


def test_token_models_keep_the_output_stride_error():
    with pytest.raises(fxfeat.OutputStrideError):
        fxfeat.compile(timm_model("vit_tiny_patch16_224"), output_stride=8)


def check_hierarchical(name: str) -> None:
    model = randomise_inert_weights(timm_model(name))
    reference = timm_feature_model(name, model).eval()
    extractor = fxfeat.compile(model, levels="auto").eval()
    reductions = extractor.feature_info.reduction()
    assert all(a < b for a, b in zip(reductions, reductions[1:])), reductions  # one level per reduction
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    with torch.no_grad():
        found = compare_levels(as_list(reference(x)), as_list(extractor(x)))
    assert found["contained"], found
    assert_bit_equal_to_eager(model, extractor, x)


@pytest.mark.parametrize("name", with_zoo(HIERARCHICAL, HIERARCHICAL_ZOO))
def test_hierarchical_token_levels_contain_timm_features_only(name):
    check_hierarchical(name)


def test_torchvision_vit_blocks_are_maps_of_the_encoder_layers():
    model = torchvision_model("vit_b_16")
    extractor = fxfeat.compile(model, out_indices=12).eval()
    info = extractor.feature_info
    assert len(info) == 12 and info.channels() == [768] * 12 and info.reduction() == [16] * 12
    assert info.module_name() == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    recorded = []
    handles = [layer.register_forward_hook(lambda m, i, o: recorded.append(o)) for layer in model.encoder.layers]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
        outputs = extractor(x)
    for handle in handles:
        handle.remove()
    for tokens, output in zip(recorded, outputs):
        assert output.shape == (1, 768, 14, 14)
        expected = tokens[:, 1:].transpose(1, 2).reshape(1, 768, 14, 14)  # the class token dropped
        assert torch.equal(output, expected)


class _TinyViT(nn.Module):
    """A patch-8 ViT with a class token and no position embedding: it accepts any size, and its grid is only
    known from the input at run time."""

    def __init__(self, width: int = 32, depth: int = 3):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, width))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(width, 4, 64, batch_first=True, dropout=0.0)
                                      for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.head(self.blocks(tokens)[:, 0])


def test_grid_follows_the_input_size_at_run_time():
    model = _TinyViT().eval()
    extractor = fxfeat.compile(model, out_indices=(0, 1, 2), input_size=(3, 64, 64)).eval()
    assert extractor.feature_info.reduction() == [8, 8, 8]
    for height, width in ((64, 64), (72, 120), (61, 90)):  # odd sizes: the patch conv floors
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            outputs = extractor(x)
            tokens = model.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([model.cls.expand(2, -1, -1), tokens], dim=1)
            grid = (height // 8, width // 8)
            for block, output in zip(model.blocks, outputs):
                tokens = block(tokens)
                assert torch.equal(output, tokens[:, 1:].transpose(1, 2).reshape(2, 32, *grid))
    sizes = [node for node in extractor.graph.nodes if node.op == "call_method" and node.target == "size"]
    assert sizes, "the grid is read from tensors at run time, not baked from the probe"


class _HeadsLikeGrid(nn.Module):
    """Single-size attention whose (tokens, heads, head_dim) tensor looks like an NCHW map: 8 heads of 8."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 64, 4, 4)
        self.position = nn.Parameter(torch.zeros(1, 144, 64))  # a 12x12 grid: the model takes 48x48 only
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        q, k, v = self.qkv(tokens).reshape(x.shape[0], -1, 3, 8, 8).permute(2, 0, 3, 1, 4)
        heads = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # (B, 8, 144, 8)
        merged = heads.transpose(1, 2)  # (B, 144, 8, 8): the token count kept whole, not a grid
        return tokens + self.proj(merged.reshape(x.shape[0], -1, 64))


def test_heads_split_off_tokens_are_not_a_map():
    from fxfeat.analyse import analyse
    from fxfeat.trace import trace_model

    traced = trace_model(_HeadsLikeGrid().eval())
    analysis = analyse(traced, (3, 48, 48))
    maps = {name for name, shape in analysis.shapes.items() if shape.is_map}
    assert maps == {"x", "patch"}, maps
    returned = next(node for node in traced.graph.nodes if node.op == "output").args[0]
    output = analysis.shapes[returned.name]
    assert (output.fmt, output.reduction, output.grid.size, output.grid.prefix) == ("NLC", 4, (12, 12), 0)


def test_token_extractor_exports_with_dynamic_sizes():
    # The reshape reads the grid with size() calls, so torch.export keeps height and width symbolic.
    model = _TinyViT().eval()
    extractor = fxfeat.compile(model, out_indices=(0, 2), input_size=(3, 64, 64)).eval()
    height, width = torch.export.Dim("height", min=2, max=64), torch.export.Dim("width", min=2, max=64)
    program = torch.export.export(extractor, (torch.randn(2, 3, 64, 96),),
                                  dynamic_shapes=({2: 8 * height, 3: 8 * width},))
    x = torch.randn(2, 3, 72, 128)
    with torch.no_grad():
        for exported, eager in zip(program.module()(x), extractor(x)):
            assert exported.shape == eager.shape == (2, 32, 9, 16)
            torch.testing.assert_close(exported, eager)
