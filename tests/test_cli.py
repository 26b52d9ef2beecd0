"""The command line (fxfeat/cli.py): inspect, export, the help and the errors a user sees (extract's CLI is in
tests/test_extract.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import fxfeat
from fxfeat import export
from fxfeat.cli import main
from fxfeat.extraction.decode import decode
from fxfeat.extraction.preprocess import resolve_preprocessing


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


def test_cli_extracts_an_open_clip_tower_and_a_dual_encoders_image_side(tmp_path):
    """open_clip:ARCH with a whole open_clip checkpoint, and hf:PATH of a CLIP model with its image processor, with
    the default features (pooled: the input of the projection), equal to the extractor on the same images."""
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    from test_extract import make_folder

    data = make_folder(tmp_path / "images", count=3)
    torch.manual_seed(0)
    whole = open_clip.create_model("ViT-S-32").eval()
    torch.save(whole.state_dict(), tmp_path / "whole.pt")
    torch.manual_seed(0)
    tower = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64)
    text = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    clip = transformers.CLIPModel(transformers.CLIPConfig(vision_config=tower, text_config=text, projection_dim=24))
    clip.save_pretrained(tmp_path / "clip")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(tmp_path / "clip")
    side = fxfeat.models.build_model(f"hf:{tmp_path / 'clip'}", "pretrained")
    for spec, weights, module, source in (
            ("open_clip:ViT-S-32", str(tmp_path / "whole.pt"), whole.visual, "open_clip image_transform"),
            (f"hf:{tmp_path / 'clip'}", "pretrained", side, "transformers AutoImageProcessor: CLIPImageProcessor")):
        out = tmp_path / spec.partition(":")[0]
        main(["extract", spec, str(data), "--out", str(out), "--weights", weights, "--workers", "0", "--quiet",
              "--dtype", "float32", "--no-optimize"])
        arrays, metadata = fxfeat.load_features(out)
        steps = resolve_preprocessing(module, spec=spec)
        assert steps.source.startswith(source)
        batch = steps.normalize(torch.stack([steps(decode(torch.frombuffer(bytearray(open(path, "rb").read()),
                                                                           dtype=torch.uint8)))
                                             for path in metadata["path"]]))
        with torch.no_grad():
            expected = fxfeat.compile(module, mode="pooled").eval()(batch)
        torch.testing.assert_close(torch.from_numpy(np.array(arrays["pooled"])), expected, rtol=1e-5, atol=1e-5)


def test_cli_help_names_the_new_model_specs(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "open_clip:ARCH[/TAG]" in printed and "a dual encoder such as CLIP or SigLIP gives its image side" in printed
