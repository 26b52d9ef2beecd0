"""The level rule on generated CNNs whose stages are known: fxfeat returns exactly the stage outputs, bit-equal.

``tests/random_cnn.py`` builds each model from a seed (block kind, containers, stem, depths, squeeze-excite,
in-place sums, stages that downsample or all keep the stem's reduction). The default suite runs a few dozen seeds;
``make test-zoo`` runs hundreds more.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxfeat
from benchmarks.references import captured_outputs
from tests.helpers import with_zoo
from tests.random_cnn import generate

CI_SEEDS = range(40)
ZOO_SEEDS = range(40, 400)
INPUT_SIZE = (3, 96, 128)


def outputs_nodes(extractor) -> list[str]:
    return [entry["node"] for entry in extractor.feature_info.get_dicts()]


def check_generated(seed: int) -> None:
    model, expected, architecture = generate(seed)
    x = torch.randn(2, *INPUT_SIZE)
    with torch.no_grad():
        references = {path: outputs[-1] for path, outputs in captured_outputs(model, expected, x).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxfeat.FxFeatWarning)  # `out[:, :c] += x` blocks are made opaque
        extractor = fxfeat.compile(model, levels="auto", input_size=INPUT_SIZE).eval()
    with torch.no_grad():
        outputs = extractor(x)
    found = extractor.feature_info.module_name()
    assert found == expected, f"{architecture}: levels {found}, expected {expected}"
    stages = set(model.paths)
    for path, output in zip(expected, outputs):
        reference = references[path]
        if architecture.functional_act and path in stages:  # F.relu(stage(x)) between the stages
            reference = torch.relu(reference)
        assert torch.equal(output, reference), f"{architecture}: {path} differs from the eager tensor"
    reductions = extractor.feature_info.reduction()
    assert reductions == [2 ** (i + 1) for i in range(len(expected))], f"{architecture}: {reductions}"
    if architecture.conv_classifier:  # the head begins at the 1x1 convolution before the pool
        head = fxfeat.inspect(model, input_size=INPUT_SIZE).head
        last = "head_conv_act" if architecture.container == "blocklist" else outputs_nodes(extractor)[-1]
        assert head.unpooled == last, f"{architecture}: {head}"  # a head conv after the trunk is forward_features


@pytest.mark.parametrize("seed", with_zoo(CI_SEEDS, ZOO_SEEDS))
def test_generated_architecture(seed):
    check_generated(seed)


def test_generator_covers_every_kind():
    """The CI seeds exercise every block kind, container and in-place sum style."""
    architectures = [generate(seed)[2] for seed in CI_SEEDS]
    from tests.random_cnn import BLOCK_KINDS, CONTAINERS, SUM_STYLES

    assert {a.block for a in architectures} == set(BLOCK_KINDS)
    assert {a.container for a in architectures} == set(CONTAINERS)
    assert {a.sum_style for a in architectures if a.block in ("residual", "slice")} == set(SUM_STYLES)
    assert {a.stem_pool for a in architectures} == {True, False}
    for feature in ("merge_at_end", "functional_act", "conv_classifier"):
        assert {getattr(a, feature) for a in architectures} == {True, False}, feature
    assert any(a.keep_stage is not None for a in architectures)
    # stages that all keep the stem's reduction, after a stem that pools (two levels) and one that does not (one)
    assert {a.stem_pool for a in architectures if a.one_reduction} == {True, False}
