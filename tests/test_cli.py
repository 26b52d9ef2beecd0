"""The command line (fxfeat/cli.py): inspect, export, the help and the errors a user sees (extract's CLI is in
tests/test_extract.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fxfeat import export
from fxfeat.cli import main


def test_inspect_cli():
    result = subprocess.run(
        [sys.executable, "-m", "fxfeat", "inspect", "torchvision:resnet18"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "layer4" in result.stdout and "reduction" in result.stdout


def test_cli_export_prints_outputs_and_parity(tmp_path, capsys):
    main(["export", "torchvision:resnet18", "--out-indices", "2,4", "--input-size", "3", "96", "96",
          "--onnx", str(tmp_path / "m.onnx"), "--torchscript", str(tmp_path / "m.pt"),
          "--exported-program", str(tmp_path / "m.pt2")])
    printed = capsys.readouterr().out
    assert "layer2" in printed and "[1, 512, 3, 3]" in printed
    assert printed.count("parity vs eager") == 9  # three checks per format
    assert export.read_feature_info(tmp_path / "m.onnx").module_name() == ["layer2", "layer4"]


def test_cli_names_an_unknown_model_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["inspect", "timm:resnet5O"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "timm has no model named 'resnet5O'" in error and "resnet50" in error and "Traceback" not in error


def test_cli_help_says_it_all_and_a_library_without_a_model_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "pretrained weights unless --weights random or --weights PATH." in printed
    assert "python -m fxfeat export timm:resnet50 --onnx out.onnx" in printed
    for spec in ("timm:", "timm", "hf:"):
        with pytest.raises(SystemExit) as exited:
            main(["export", spec, "--onnx", "out.onnx"])
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert f"{spec!r} names a library but no model" in error and "torchvision has no model" not in error
