"""The compute dtype of ``fxfeat.extract``: forced bfloat16 rows within bfloat16 rounding of float32, the compute
dtype part of the configuration a rerun must match, float32 rows computed in float32 without a probe, and the probe's
choice recorded in the summary and the manifest. No test depends on which dtype the probe picks on this machine."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_extract import FAST, ROOT, make_folder, small_model

import fxfeat

AUTO = {**FAST, "compute_dtype": None}


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_forced_bfloat16_rows_are_within_bfloat16_rounding_of_float32(tmp_path):
    data = make_folder(tmp_path / "images", count=12)
    model = small_model()
    single = fxfeat.extract(model, data, tmp_path / "float32", **{**FAST, "dtype": torch.float32})
    half = fxfeat.extract(model, data, tmp_path / "bfloat16", **{**FAST, "compute_dtype": torch.bfloat16})
    assert (single.compute["dtype"], half.compute) == ("float32", {"dtype": "bfloat16", "reason": "forced",
                                                                   "probe": None})
    reference = np.asarray(fxfeat.load_features(tmp_path / "float32")[0]["pooled"], np.float64)
    rows = np.asarray(fxfeat.load_features(tmp_path / "bfloat16")[0]["pooled"], np.float64)
    cosine = (reference * rows).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(rows, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert not np.array_equal(reference.astype(np.float16), rows)  # computed in bfloat16 indeed
    manifest = _manifest(tmp_path / "bfloat16")
    assert manifest["config"]["compute_dtype"] == "bfloat16"
    assert {part["run"]["compute_dtype"] for part in manifest["parts"]} == {"bfloat16"}


def test_a_rerun_in_another_compute_dtype_is_refused_and_auto_keeps_the_recorded_one(tmp_path):
    data = make_folder(tmp_path / "images", count=6)
    out = tmp_path / "out"
    first = fxfeat.extract(small_model(), data, out, shard_size=2, **{**FAST, "compute_dtype": torch.bfloat16})
    (out / ".fxfeat" / "parts" / "part-00001.json").unlink()
    with pytest.raises(fxfeat.OutputDirectoryError, match="compute_dtype is 'bfloat16' there and 'float32' now"):
        fxfeat.extract(small_model(), data, out, shard_size=2, **FAST)
    rerun = fxfeat.extract(small_model(), data, out, shard_size=2, **AUTO)  # auto: the output's dtype, no probe
    assert rerun.compute == {"dtype": "bfloat16", "reason": "recorded", "probe": None}
    assert (rerun.parts_written, rerun.parts_kept) == (1, 2) and first.compute["dtype"] == "bfloat16"
    assert {part["run"]["compute_dtype"] for part in _manifest(out)["parts"]} == {"bfloat16"}
    with pytest.raises(fxfeat.InvalidRequestError, match="compute_dtype must be"):
        fxfeat.extract(small_model(), data, out, **{**FAST, "compute_dtype": "bfloat16"})


def test_float32_rows_are_computed_in_float32_without_a_probe(tmp_path):
    data = make_folder(tmp_path / "images", count=3)
    summary = fxfeat.extract(small_model(), data, tmp_path / "out", **{**AUTO, "dtype": torch.float32})
    assert summary.compute == {"dtype": "float32", "reason": "float32 rows", "probe": None}
    assert _manifest(tmp_path / "out")["config"]["compute_dtype"] == "float32"


def test_the_probes_choice_and_timings_are_recorded(tmp_path):
    data = make_folder(tmp_path / "images", count=3)
    summary = fxfeat.extract(small_model(), data, tmp_path / "out", **AUTO)  # float16 rows on the CPU: probed
    probe = summary.compute["probe"]
    assert summary.compute["reason"] == "probe" and summary.compute["dtype"] == probe["chosen"]
    assert probe["chosen"] in ("float32", "bfloat16") and set(probe["images_per_second"]) == {"float32", "bfloat16"}
    assert all(speed > 0 for speed in probe["images_per_second"].values())
    faster = probe["images_per_second"]["bfloat16"] >= probe["margin"] * probe["images_per_second"]["float32"]
    assert probe["chosen"] == ("bfloat16" if faster else "float32")  # the rule, whichever way this CPU goes
    manifest = _manifest(tmp_path / "out")
    assert manifest["config"]["compute_dtype"] == probe["chosen"]
    assert all(part["run"]["compute"] == summary.compute for part in manifest["parts"])
    assert f"computed in {probe['chosen']} (probe: float32 " in str(summary)


def test_the_command_line_forces_either_and_refuses_a_rerun_in_the_other(tmp_path):
    data = make_folder(tmp_path / "images", count=4)
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(small_model().state_dict(), checkpoint)
    command = [sys.executable, "-m", "fxfeat", "extract", "torchvision:resnet18", str(data), "--out",
               str(tmp_path / "out"), "--weights", str(checkpoint), "--input-size", "3", "64", "64", "--workers", "0"]
    first = subprocess.run([*command, "--compute-dtype", "bfloat16"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0 and "computed in bfloat16 (forced)" in first.stdout, first.stderr[-2000:]
    refused = subprocess.run([*command, "--compute-dtype", "float32"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "compute_dtype is 'bfloat16' there and 'float32' now" in refused.stderr
    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)  # auto
    assert rerun.returncode == 0 and "computed in bfloat16 (recorded)" in rerun.stdout, rerun.stderr[-2000:]
