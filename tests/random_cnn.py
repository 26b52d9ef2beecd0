"""A seeded generator of CNNs whose stage structure is known, for testing the level rule.

Each generated model has a strided stem, then stages that each halve the resolution once (in the first block,
or in a downsampling module of their own, or in a transition between stages), built from one kind of block:

- ``plain``: conv-norm-act;
- ``residual``: a ResNet basic block (projection shortcut when the shape changes), its sum out of place, in place
  (``out.add_(shortcut)``) or augmented (``out += shortcut``);
- ``inverted``: MobileNetV2's expand / depthwise / project, all three made of the *same* wrapper class;
- ``dense``: DenseNet layers concatenating their input, with a transition (1x1 conv + average pool) between
  stages;
- ``slice``: ReXNet's partial residual on the first channels, concatenated, written in place
  (``out[:, :c].add_(x)``) or augmented (``out[:, :c] += x``, which torch.fx cannot trace);
- ``nhwc``: a ConvNeXt block (depthwise conv, then norm and MLP in channels-last, permuted back);
- and any of them with squeeze-and-excitation.

Stages are held in an ``nn.Sequential``, an ``nn.ModuleList`` iterated by ``forward``, as attributes of the
model, flattened with the stem into one ``features`` container (torchvision's MobileNetV2), or their blocks in one
flat ``blocks`` list at the root with a head convolution beside it (efficientnet_pytorch's layout); a stage itself
is an ``nn.Sequential`` of blocks or a module of its own. The expected levels are the stem's output at reduction 2
(or its conv before a stride-2 max pooling) and each stage's output; the generator returns their module paths.

Besides (issue 23's structures, each drawn at random): a stage of another block kind that keeps the resolution
after a stage (one level per reduction: the later stage's), stages that downsample at their end (a 2x2 merging
after their blocks, as Swin's: the level is the last block's output), an activation applied as a function between
stages (``F.relu(stage(x))``: the level is the function's output, its module the stage), and a 1x1 convolution as
the classifier before the global pool (unpooled is the last level, not the classifier's map). And (issue 29) stages
none of which downsample: every stage keeps the reduction the stem ends at, so the levels are the last map at each
reduction, the stem's (its conv, when a max pooling follows it) and the last stage's output, not the blocks of an
isotropic body.

Example:
    >>> model, expected, architecture = generate(3)
    >>> expected[0], len(expected) == len(architecture.depths) + 1
    ('stem.conv', True)
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Architecture", "generate"]

BLOCK_KINDS = ("plain", "residual", "inverted", "dense", "slice", "nhwc")
CONTAINERS = ("sequential", "modulelist", "attributes", "flat", "blocklist")
SUM_STYLES = ("out_of_place", "method", "augmented")


class ConvNormAct(nn.Module):
    """The one wrapper class every block is built from (conv, batch norm, optional activation)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(channels // 4, 4), 1)
        self.expand = nn.Conv2d(max(channels // 4, 4), channels, 1)

    def forward(self, x):
        scale = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * scale.sigmoid()


def _maybe_se(channels: int, se: bool) -> nn.Module:
    return SqueezeExcite(channels) if se else nn.Identity()


class PlainBlock(nn.Module):
    def __init__(self, cin, cout, stride, se):
        super().__init__()
        self.conv = ConvNormAct(cin, cout, 3, stride)
        self.se = _maybe_se(cout, se)

    def forward(self, x):
        return self.se(self.conv(x))


class ResidualBlock(nn.Module):
    """A ResNet basic block; the sum is written ``out + shortcut``, ``out.add_(shortcut)`` or
    ``out += shortcut`` (``sum_style``)."""

    def __init__(self, cin, cout, stride, se, sum_style: str):
        super().__init__()
        self.conv1 = ConvNormAct(cin, cout, 3, stride)
        self.conv2 = ConvNormAct(cout, cout, 3, act=False)
        self.se = _maybe_se(cout, se)
        self.shortcut = ConvNormAct(cin, cout, 1, stride, act=False) if stride > 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.sum_style = sum_style

    def forward(self, x):
        out = self.se(self.conv2(self.conv1(x)))
        if self.sum_style == "method":
            out.add_(self.shortcut(x))
        elif self.sum_style == "augmented":
            out += self.shortcut(x)
        else:
            out = out + self.shortcut(x)
        return self.act(out)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, se):
        super().__init__()
        hidden = cin * 3
        self.expand = ConvNormAct(cin, hidden, 1)
        self.depthwise = ConvNormAct(hidden, hidden, 3, stride, groups=hidden)
        self.se = _maybe_se(hidden, se)
        self.project = ConvNormAct(hidden, cout, 1, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return out + x if self.residual else out


class SliceResidual(nn.Module):
    """ReXNet's partial residual: the block widens the map and adds its input to its first channels, written
    ``torch.cat([out[:, :c] + x, out[:, c:]])``, ``out[:, :c].add_(x)`` or ``out[:, :c] += x`` (``sum_style``;
    torch.fx cannot trace the last one, so fxfeat keeps such a block opaque)."""

    def __init__(self, cin, cout, stride, se, sum_style: str):
        super().__init__()
        self.expand = ConvNormAct(cin, cin * 2, 1)
        self.depthwise = ConvNormAct(cin * 2, cin * 2, 3, stride, groups=cin * 2)
        self.se = _maybe_se(cin * 2, se)
        self.project = ConvNormAct(cin * 2, cout, 1, act=False)
        self.in_channels = cin if stride == 1 and cout >= cin else 0
        self.sum_style = sum_style

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.in_channels:
            return out
        if self.sum_style == "method":
            out[:, :self.in_channels].add_(x)
        elif self.sum_style == "augmented":
            out[:, :self.in_channels] += x
        else:
            out = torch.cat([out[:, :self.in_channels] + x, out[:, self.in_channels:]], 1)
        return out


class DenseLayer(nn.Module):
    def __init__(self, cin, growth, se):
        super().__init__()
        self.conv1 = ConvNormAct(cin, growth * 2, 1)
        self.conv2 = ConvNormAct(growth * 2, growth, 3)
        self.se = _maybe_se(growth, se)

    def forward(self, x):
        return torch.cat([x, self.se(self.conv2(self.conv1(x)))], 1)


class Transition(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = ConvNormAct(cin, cout, 1)
        self.pool = nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.pool(self.conv(x))


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, channels, se):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1 = nn.Linear(channels, channels * 2)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(channels * 2, channels)
        self.se = _maybe_se(channels, se)

    def forward(self, x):
        shortcut = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x)))).permute(0, 3, 1, 2)
        return self.se(x) + shortcut


class Downsample(nn.Module):
    """ConvNeXt's downsampling between stages: a norm, then a 2x2 stride-2 conv."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm = LayerNorm2d(cin)
        self.conv = nn.Conv2d(cin, cout, 2, 2)

    def forward(self, x):
        return self.conv(self.norm(x))


class Stage(nn.Module):
    """A stage as a module of its own: an optional downsampling module, then a list of blocks (or, with
    ``merge_at_end``, the blocks and then the downsampling)."""

    def __init__(self, downsample: nn.Module | None, blocks: list[nn.Module], merge_at_end: bool = False):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.ModuleList(blocks)
        self.merge_at_end = merge_at_end

    def forward(self, x):
        if not self.merge_at_end:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.merge_at_end else x


class Merging(nn.Module):
    """Swin-style patch merging closing a stage: a norm, then a 2x2 stride-2 convolution."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.reduction = nn.Conv2d(cin, cout, 2, 2)

    def forward(self, x):
        return self.reduction(self.norm(x))


class Stem(nn.Module):
    def __init__(self, channels: int, max_pool: bool):
        super().__init__()
        self.conv = ConvNormAct(3, channels, 3, 2)
        self.pool = nn.MaxPool2d(3, 2, 1) if max_pool else nn.Identity()

    def forward(self, x):
        return self.pool(self.conv(x))


@dataclass(frozen=True)
class Architecture:
    """What :func:`generate` chose (for test ids and failure messages)."""

    seed: int
    block: str
    container: str
    stage_type: str
    stem_pool: bool
    depths: tuple[int, ...]
    se: bool
    sum_style: str
    keep_stage: int | None = None  # after this stage, another of another block kind at the same resolution
    one_reduction: bool = False  # no stage downsamples: all keep the reduction the stem ends at
    merge_at_end: bool = False
    functional_act: bool = False
    conv_classifier: bool = False

    def __str__(self) -> str:
        return (f"seed={self.seed} block={self.block} container={self.container} stage={self.stage_type} "
                f"stem_pool={self.stem_pool} depths={self.depths} se={self.se} sum={self.sum_style} "
                f"keep_stage={self.keep_stage} one_reduction={self.one_reduction} merge_at_end={self.merge_at_end} "
                f"functional_act={self.functional_act} conv_classifier={self.conv_classifier}")


class GeneratedNet(nn.Module):
    """Stem, stages (in the chosen container), global pooling and a linear classifier.

    ``container="flat"`` puts the stem and every block of every stage in one ``nn.Sequential`` (torchvision's
    MobileNetV2 and VGG ``features``); the others keep one module per stage. ``paths`` are the stages' outputs;
    ``enclosing`` the called container that returns the last one too (``None`` if there is none).
    """

    def __init__(self, stem: nn.Module, stages: list[list[nn.Module]], channels: int, container: str,
                 stage_type: str, num_classes: int = 10, merge_at_end: bool = False, functional_act: bool = False,
                 conv_classifier: bool = False):
        super().__init__()
        self.container, self.functional_act = container, functional_act
        self.enclosing = {"flat": "features", "sequential": "stages"}.get(container)
        if container in ("flat", "blocklist"):
            flat = [module for stage in stages for module in stage]
            ends = [sum(len(stage) for stage in stages[:i + 1]) for i in range(len(stages))]
            if container == "flat":
                self.features = nn.Sequential(stem, *flat)
                self.paths = [f"features.{end}" for end in ends]
            else:  # efficientnet_pytorch: the blocks in one list, a head convolution beside them at the root
                self.stem, self.blocks = stem, nn.ModuleList(flat)
                self.head_conv = ConvNormAct(channels, channels, 1)
                self.paths = [f"blocks.{end - 1}" for end in ends]
        else:
            self.stem = stem
            wrapped = [_wrap(stage_type, stage, merge_at_end and i < len(stages) - 1) for i, stage in enumerate(stages)]
            if container == "sequential":
                self.stages = nn.Sequential(*wrapped)
            elif container == "modulelist":
                self.stages = nn.ModuleList(wrapped)
            else:
                for i, stage in enumerate(wrapped):
                    setattr(self, f"stage{i + 1}", stage)
            self.paths = [f"stage{i + 1}" if container == "attributes" else f"stages.{i}" for i in range(len(stages))]
        self.pool = nn.AdaptiveAvgPool2d(1)
        if conv_classifier:  # a 1x1 convolution on the map, then the pooling (SqueezeNet's head)
            self.classifier = nn.Conv2d(channels, num_classes, 1)
        else:
            self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        if self.container == "flat":
            x = self.features(x)
        else:
            x = self.stem(x)
            if self.container == "sequential":
                x = self.stages(x)
            else:
                for module in self.blocks if self.container == "blocklist" else map(self.get_submodule, self.paths):
                    x = module(x)
                    if self.functional_act and self.container != "blocklist":
                        x = F.relu(x)
            if self.container == "blocklist":
                x = self.head_conv(x)
        if hasattr(self, "classifier"):
            return torch.flatten(self.pool(self.classifier(x)), 1)
        return self.fc(torch.flatten(self.pool(x), 1))


def _block(kind: str, cin: int, cout: int, stride: int, se: bool, sum_style: str) -> nn.Module:
    if kind == "plain":
        return PlainBlock(cin, cout, stride, se)
    if kind == "residual":
        return ResidualBlock(cin, cout, stride, se, sum_style)
    if kind == "inverted":
        return InvertedResidual(cin, cout, stride, se)
    if kind == "slice":
        return SliceResidual(cin, cout, stride, se, sum_style)
    raise ValueError(kind)


def generate(seed: int) -> tuple[nn.Module, list[str], Architecture]:
    """A random CNN (eval mode, random weights from ``seed``), the module paths of its expected levels, and
    what was chosen."""
    rng = random.Random(seed)
    architecture = Architecture(
        seed=seed,
        block=rng.choice(BLOCK_KINDS),
        container=rng.choice(CONTAINERS),
        stage_type=rng.choice(("sequential", "module")),
        stem_pool=rng.random() < 0.5,
        depths=tuple(rng.randint(1, 3) for _ in range(rng.randint(2, 4))),
        se=rng.random() < 0.3,
        sum_style=rng.choice(SUM_STYLES),
    )
    merge = (architecture.stage_type == "module"
             and architecture.container in ("sequential", "modulelist", "attributes")
             and architecture.block in ("plain", "residual", "inverted") and rng.random() < 0.9)
    keep = None if merge or rng.random() < 0.6 else rng.randrange(len(architecture.depths))
    functional = architecture.container in ("modulelist", "attributes") and rng.random() < 0.5
    conv_classifier = rng.random() < 0.3
    # No stage downsamples (a flat list of blocks after the stem, without stages, is an isotropic body instead:
    # ConvMixer's layout). Stages of one block each cannot be told from blocks in containers: one has two.
    one_reduction = (not merge and keep is None and architecture.container != "blocklist"
                     and rng.random() < 0.4)
    depths = architecture.depths
    if one_reduction and max(depths) == 1:
        depths = (*depths[:-1], 2)
    architecture = dataclasses.replace(architecture, keep_stage=keep, merge_at_end=merge, functional_act=functional,
                                       conv_classifier=conv_classifier, one_reduction=one_reduction, depths=depths)
    torch.manual_seed(seed)
    width = rng.choice((8, 12, 16))
    stem = Stem(width, architecture.stem_pool)
    stages: list[list[nn.Module]] = []
    channels, dropped = width, None
    for index, depth in enumerate(architecture.depths):
        if merge:  # blocks at the stem's resolution first; each stage but the last closes with a merging
            last = index == len(architecture.depths) - 1
            blocks = [_block(architecture.block, channels, channels, 1, architecture.se, architecture.sum_style)
                      for _ in range(depth)]
            stages.append(blocks if last else [*blocks, Merging(channels, channels * 2)])
            channels = channels if last else channels * 2
            continue
        # With a max-pooling stem the first stage keeps the resolution (ResNet); otherwise every stage halves it.
        stride = 1 if index == 0 and architecture.stem_pool or one_reduction else 2
        out = channels * 2 if stride == 2 else channels
        stages.append(_stage(architecture, channels, out, stride, depth))
        channels = _dense_channels(stages[-1][-1]) if architecture.block == "dense" else out
        if index == keep:  # a stage of another kind at the same resolution: the level of it is the later one
            kind = rng.choice([k for k in ("plain", "residual", "inverted") if k != architecture.block])
            stages.append([_block(kind, channels, channels, 1, architecture.se, architecture.sum_style)
                           for _ in range(2)])  # one block of another kind ending a flat list would be head
            dropped = len(stages) - 2
    model = GeneratedNet(stem, stages, channels, architecture.container, architecture.stage_type,
                         merge_at_end=merge, functional_act=functional,
                         conv_classifier=architecture.conv_classifier)
    stem_path = "features.0" if architecture.container == "flat" else "stem"
    stem_level = f"{stem_path}.conv" if architecture.stem_pool else stem_path
    paths = [path for i, path in enumerate(model.paths) if i != dropped]
    if merge:  # stage 0 runs at the stem's reduction; the level of each merged stage is its last block
        paths = [f"{path}.blocks.{len(stage) - 2}" for path, stage in zip(model.paths[:-1], stages)]
        expected = [stem_level] * architecture.stem_pool + [*paths, model.paths[-1]]
    elif one_reduction:  # the stem's level if it pools after its conv, then the last stage's output, named by the
        # outermost module returning it that holds no other level
        expected = [stem_level] * architecture.stem_pool
        enclosing = model.enclosing
        holds_other = enclosing is not None and any(path.startswith(enclosing + ".") for path in expected)
        expected.append(enclosing if enclosing is not None and not holds_other else model.paths[-1])
    else:
        expected = [stem_level, *paths]
    _randomise_norms(model)
    return model.eval(), expected, architecture


def _stage(architecture: Architecture, cin: int, cout: int, stride: int, depth: int) -> list[nn.Module]:
    """The modules of one stage, in order: a downsampling module if the stage has one, then its blocks."""
    kind, se = architecture.block, architecture.se
    if kind == "dense":
        growth = 8
        transition = [Transition(cin, cin)] if stride == 2 else []
        return transition + [DenseLayer(cin + i * growth, growth, se) for i in range(depth)]
    if kind == "nhwc":
        downsample = [Downsample(cin, cout)] if stride == 2 else []
        return downsample + [ConvNeXtBlock(cout, se) for _ in range(depth)]
    blocks = [_block(kind, cin, cout, stride, se, architecture.sum_style)]
    return blocks + [_block(kind, cout, cout, 1, se, architecture.sum_style) for _ in range(depth - 1)]


def _wrap(stage_type: str, modules: list[nn.Module], merge_at_end: bool = False) -> nn.Module:
    if stage_type == "module":
        if merge_at_end:  # the blocks keep the resolution; a merging closes the stage
            return Stage(modules[-1], modules[:-1], merge_at_end=True)
        has_downsample = isinstance(modules[0], (Transition, Downsample))
        return Stage(modules[0] if has_downsample else None, modules[1:] if has_downsample else modules)
    return nn.Sequential(*modules)


def _dense_channels(layer: DenseLayer) -> int:
    """Channels a dense layer outputs: its input's and its growth."""
    return layer.conv1.conv.in_channels + layer.conv2.conv.out_channels


def _randomise_norms(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics, so that a wrong level cannot pass as equal by accident."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
