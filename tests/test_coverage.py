"""A representative handful of ``make coverage``'s cases, and the report's plumbing.

Each model is checked as the coverage run checks it (``benchmarks.coverage_check.check_model``): fxfeat's
automatic levels tensor for tensor against timm's ``features_only`` (same weights), the declared levels, timm's
dilated model at ``output_stride=8`` where timm has one, and the eager model; and its head features against the
library's own outputs.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from benchmarks import coverage
from benchmarks.coverage_check import check_model, compare_feature, head_features, head_miss
from benchmarks.coverage_libraries import check_heads

# Each one exercises a part of the rule: ResNet's root-level stem and max pooling; inverted residuals and a
# stage at reduction 2; a stem that halves the resolution twice with convolutions (not a level inside it);
# a patch-embedding stem down to 16 and stages down to 64; NF-Net's blocks, registered as untraceable by timm
# but traced through, dilated at output_stride=8; SelecSLS's blocks, which pass lists of maps.
REPRESENTATIVE = ["resnet10t", "mobilenetv2_035", "efficientformerv2_s0", "shvit_s1", "nf_regnet_b0", "selecsls42"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_timm_family(name):
    result = check_model("timm", name, heads=False)
    assert result["declared"]["equal"], result["declared"]
    assert result["eager_equal"], result.get("eager")
    if result["output_stride"]["supported"]:
        assert result["output_stride"]["equal"], result["output_stride"]


@pytest.mark.parametrize("name", [name for name in REPRESENTATIVE if name != "nf_regnet_b0"])
def test_identical_where_timm_follows_the_same_convention(name):
    # nf_regnet_b0 is left out: timm declares its final 1x1 conv, after the stages, as the last level.
    result = check_model("timm", name, output_stride=False, heads=False)
    assert result["auto"]["identical"], coverage.miss_reason(result)


def test_coverage_run_writes_its_reports(tmp_path):
    out, markdown = tmp_path / "coverage.json", tmp_path / "coverage.md"
    coverage.main(["--models", "timm:resnet10t", "torchvision:mobilenet_v3_small", "--workers", "1", "--quiet",
                   "--timeout", "120", "--out", str(out), "--markdown", str(markdown)])
    report = json.loads(out.read_text())
    assert {r["name"] for r in report["results"]} == {"resnet10t", "mobilenet_v3_small"}
    assert report["summary"]["cnn_identical"] == {"hits": 1, "total": 1}
    assert report["summary"]["torchvision_eager_equal"] == {"hits": 1, "total": 1}
    for key in ("timm_pooled_head", "timm_pooled_headless", "timm_embedding_head", "timm_embedding_headless",
                "timm_unpooled_head", "torchvision_pooled_head", "torchvision_embedding_head",
                "torchvision_pooled_identity_head", "torchvision_embedding_identity_head"):
        assert report["summary"][key] == {"hits": 1, "total": 1}, key
    text = markdown.read_text()
    assert "| resnet10t |" in text and "mobilenet_v3_small" in text and "median compile time" in text
    assert "| yes yes yes / yes yes |" in text and "| yes yes / yes yes |" in text  # the per-model marks
    assert "## Head features: misses" in text and "| none | | | |" in text
    # Without the classifier, the pooled vector is the model's own output: one shape for both features.
    for result in report["results"]:
        heads = result["heads"]
        other = heads["headless" if result["library"] == "timm" else "identity_head"]
        assert other["pooled"]["shape"] == other["embedding"]["shape"] == heads["head"]["pooled"]["shape"]
        assert heads["head"]["embedding"]["shape"] != heads["head"]["pooled"]["shape"]


class _Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.last_linear = nn.Linear(8, 5)

    def forward(self, x):
        return self.last_linear(self.body(x))


def test_a_head_feature_unlike_its_reference_is_a_miss_with_its_reason():
    model, x = _Classifier().eval(), torch.randn(1, 3, 32, 32)
    outputs = head_features(model, x, ("pooled", "embedding"))
    with torch.no_grad():
        pooled, embedding = model.body(x), model(x)
    assert compare_feature(outputs["pooled"], lambda: pooled)["equal"]
    nudged = compare_feature(outputs["embedding"], lambda: embedding + 1e-6 * embedding.abs().max())
    assert not nudged["equal"] and nudged["max_abs_diff"] > 0 and "values differ" in head_miss(nudged)
    other_shape = compare_feature(outputs["embedding"], lambda: pooled)
    assert not other_shape["equal"] and other_shape["reference_shape"] == list(pooled.shape)
    failed = compare_feature(outputs["pooled"], lambda: model.missing(x))
    assert not failed.get("equal") and head_miss(failed).startswith("no reference: AttributeError")


def test_library_heads_compare_with_the_library_and_expect_no_vector_from_maps():
    model, x = _Classifier().eval(), torch.randn(1, 3, 32, 32)
    # pretrainedmodels' classifier is `last_linear`: pooled is the model with it made an identity.
    heads = check_heads("pretrainedmodels", model, x, (3, 32, 32))
    assert heads["pooled"]["equal"] and heads["embedding"]["equal"], heads
    # A model returning maps (an smp encoder) has neither: HeadNotFoundError is expected, not a miss ...
    heads = check_heads("smp", model.body[:2], x, (3, 32, 32))
    assert all("HeadNotFoundError" in heads[feature]["expected_error"] for feature in ("pooled", "embedding"))
    # ... and a vector where the library says there is none is one.
    heads = check_heads("smp", model, x, (3, 32, 32))
    assert "unexpected" in heads["embedding"] and not heads["embedding"].get("equal")


def _partial_then_dies(connection):
    """A coverage worker that sends its level results, then dies in its head checks."""
    case = connection.recv()
    connection.send((coverage.PARTIAL, dict(case, auto=dict(identical=True))))


def test_a_worker_lost_in_its_head_checks_keeps_its_level_results():
    pool = coverage._Pool(1, timeout=120, target=_partial_then_dies)
    results = []
    try:
        pool.run([dict(library="timm", name="resnet10t", family="resnet")], results.append)
    finally:
        pool.close()
    (result,) = results
    assert result["auto"] == {"identical": True} and "error" not in result
    assert result["heads"]["error"].startswith("the worker process died")


def test_a_model_past_the_time_limit_is_reported_not_waited_for(tmp_path):
    out = tmp_path / "coverage.json"
    coverage.main(["--models", "timm:resnet10t", "--workers", "1", "--quiet", "--timeout", "0.5",
                   "--out", str(out), "--markdown", str(tmp_path / "coverage.md")])
    (result,) = json.loads(out.read_text())["results"]
    assert result["error"].startswith("timeout")
