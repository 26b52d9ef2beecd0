"""A representative handful of ``make coverage``'s cases, and the report's plumbing.

Each model is checked as the coverage run checks it (``benchmarks.coverage_check.check_model``): fxfeat's
automatic levels tensor for tensor against timm's ``features_only`` (same weights), the declared levels, timm's
dilated model at ``output_stride=8`` where timm has one, and the eager model.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import coverage
from benchmarks.coverage_check import check_model

# Each one exercises a part of the rule: ResNet's root-level stem and max pooling; inverted residuals and a
# stage at reduction 2; a stem that halves the resolution twice with convolutions (not a level inside it);
# a patch-embedding stem down to 16 and stages down to 64; NF-Net's blocks, registered as untraceable by timm
# but traced through, dilated at output_stride=8; SelecSLS's blocks, which pass lists of maps.
REPRESENTATIVE = ["resnet10t", "mobilenetv2_035", "efficientformerv2_s0", "shvit_s1", "nf_regnet_b0", "selecsls42"]


@pytest.mark.parametrize("name", REPRESENTATIVE)
def test_representative_timm_family(name):
    result = check_model("timm", name)
    assert result["declared"]["equal"], result["declared"]
    assert result["eager_equal"], result.get("eager")
    if result["output_stride"]["supported"]:
        assert result["output_stride"]["equal"], result["output_stride"]


@pytest.mark.parametrize("name", [name for name in REPRESENTATIVE if name != "nf_regnet_b0"])
def test_identical_where_timm_follows_the_same_convention(name):
    # nf_regnet_b0 is left out: timm declares its final 1x1 conv, after the stages, as the last level.
    result = check_model("timm", name, output_stride=False)
    assert result["auto"]["identical"], coverage.miss_reason(result)


def test_coverage_run_writes_its_reports(tmp_path):
    out, markdown = tmp_path / "coverage.json", tmp_path / "coverage.md"
    coverage.main(["--models", "timm:resnet10t", "torchvision:mobilenet_v3_small", "--workers", "1", "--quiet",
                   "--timeout", "120", "--out", str(out), "--markdown", str(markdown)])
    report = json.loads(out.read_text())
    assert {r["name"] for r in report["results"]} == {"resnet10t", "mobilenet_v3_small"}
    assert report["summary"]["cnn_identical"] == {"hits": 1, "total": 1}
    assert report["summary"]["torchvision_eager_equal"] == {"hits": 1, "total": 1}
    text = markdown.read_text()
    assert "| resnet10t |" in text and "mobilenet_v3_small" in text and "median compile time" in text


def test_a_model_past_the_time_limit_is_reported_not_waited_for(tmp_path):
    out = tmp_path / "coverage.json"
    coverage.main(["--models", "timm:resnet10t", "--workers", "1", "--quiet", "--timeout", "0.5",
                   "--out", str(out), "--markdown", str(tmp_path / "coverage.md")])
    (result,) = json.loads(out.read_text())["results"]
    assert result["error"].startswith("timeout")
