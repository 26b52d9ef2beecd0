"""The extraction's on-disk format (fxfeat/extraction/format.py): its versions (a directory of format /1, written by
the fxfeat of before, read and resumed; a newer one refused), numpy's own ``.npy`` files streamed part by part, one
naming rule for folders, ``return_dict`` keys and exported outputs, the model traced once, and a run that writes no
row failing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet
import pytest
import torch
from PIL import Image
from torch import nn

import fxfeat
from fxfeat import api, export
from fxfeat.extraction.features import build_extractor
from fxfeat.extraction.format import FORMAT
from fxfeat.extraction.parts import PartWriter

ROOT = Path(__file__).resolve().parent.parent
FORMAT_1 = ROOT / "tests" / "data" / "features-v1"  # written by fxfeat at commit 06e7cfd (tests/data/README.md)
FAST = dict(input_size=(3, 16, 16), num_workers=0, progress=False, compute_dtype=torch.float32)


class Tiny(nn.Module):
    """The model tests/data/features-v1 was extracted with: two levels, a pool and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.stage(torch.relu(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def _images(folder: Path, count: int = 3, broken: bool = False) -> Path:
    (folder / "a").mkdir(parents=True)
    for index in range(count):
        path = folder / "a" / f"{index}.png"
        if broken:
            path.write_bytes(b"not an image " * index)
        else:
            Image.new("RGB", (20 + 4 * index, 16), color=(60 * index, 90, 30)).save(path)
    return folder


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_format_1_directory_written_before_format_2_is_read(tmp_path):
    assert _manifest(FORMAT_1)["format"] == "fxfeat-features/1" != FORMAT
    arrays, metadata = fxfeat.load_features(FORMAT_1, verify=True)
    assert {name: array.shape for name, array in arrays.items()} == {
        "pooled": (3, 6), "stem": (3, 4, 8, 8), "stage": (3, 6, 4, 4)}
    assert list(metadata["id"]) == [0, 1, 2] and list(metadata["width"]) == [20, 24, 28]
    for name, array in arrays.items():  # the rows of both parts, in order
        parts = [np.load(FORMAT_1 / name / f"part-0000{part}.npy") for part in (0, 1)]
        np.testing.assert_array_equal(np.asarray(array), np.concatenate(parts))
    damaged = tmp_path / "damaged"
    shutil.copytree(FORMAT_1, damaged)
    content = bytearray((damaged / "stem" / "part-00001.npy").read_bytes())
    content[-1] ^= 0xFF
    (damaged / "stem" / "part-00001.npy").write_bytes(bytes(content))
    with pytest.raises(fxfeat.OutputDirectoryError, match="stem/part-00001.npy do not match"):
        fxfeat.load_features(damaged, verify=True)


def test_a_format_1_directory_of_the_same_configuration_resumes_as_format_2(tmp_path):
    data = _images(tmp_path / "images")
    out = tmp_path / "out"
    torch.manual_seed(0)
    model = Tiny().eval()
    fxfeat.extract(model, data, out, features=["pooled", "features"], shard_size=2, **FAST)
    before, _ = fxfeat.load_features(out)
    manifest = _manifest(out)
    manifest["format"] = "fxfeat-features/1"  # /1's layout is /2's where no two features share a name
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / ".fxfeat" / "parts" / "part-00001.json").unlink()
    summary = fxfeat.extract(model, data, out, features=["pooled", "features"], shard_size=2, **FAST)
    assert (summary.parts_kept, summary.parts_written) == (1, 1)
    assert _manifest(out)["format"] == FORMAT and _manifest(out)["complete"]
    after, _ = fxfeat.load_features(out, verify=True)
    for name in before:
        np.testing.assert_array_equal(np.asarray(after[name]), np.asarray(before[name]))
    manifest = _manifest(out)
    manifest["format"] = "fxfeat-features/1"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxfeat.OutputDirectoryError, match="written in format fxfeat-features/1.*shard_size"):
        fxfeat.extract(model, data, out, features=["pooled", "features"], shard_size=3, **FAST)


def test_a_format_this_fxfeat_does_not_know_is_refused(tmp_path):
    data = _images(tmp_path / "images")
    out = tmp_path / "out"
    fxfeat.extract(Tiny().eval(), data, out, **FAST)
    manifest = _manifest(out)
    manifest["format"] = "fxfeat-features/9"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(fxfeat.OutputDirectoryError, match="format fxfeat-features/9, which this fxfeat"):
        fxfeat.load_features(out)
    with pytest.raises(fxfeat.OutputDirectoryError, match="upgrade fxfeat"):
        fxfeat.extract(Tiny().eval(), data, out, **FAST)


def test_parts_are_numpys_own_npy_files_streamed_to_disk(tmp_path):
    rows = np.random.default_rng(0).standard_normal((300, 1024)).astype(np.float32)
    writer = PartWriter(str(tmp_path), part=4, rows=(1200, 1600), features={"pooled": ((1024,), np.float32)})
    streamed = next(iter(writer._arrays.values())).path
    for start in range(0, 300, 100):
        writer.add(ids=list(range(start, start + 100)), keys=[None] * 100, labels=[None] * 100,
                   sizes=[(1, 1)] * 100, arrays={"pooled": rows[start:start + 100]})
        assert Path(streamed).stat().st_size >= (start + 100) * 1024 * 4  # on disk as it comes, not held
    record = writer.commit()
    written = tmp_path / "pooled" / "part-00004.npy"
    np.save(tmp_path / "reference.npy", rows)
    assert written.read_bytes() == (tmp_path / "reference.npy").read_bytes()  # byte for byte numpy's np.save
    assert record["count"] == 300 and record["files"]["pooled/part-00004.npy"]["bytes"] == written.stat().st_size
    schema = pyarrow.parquet.read_schema(tmp_path / "metadata" / "part-00004.parquet")
    assert [(field.name, str(field.type)) for field in schema] == [
        ("id", "int64"), ("path", "string"), ("label", "int64"), ("width", "int32"), ("height", "int32")]


class SharedActivation(nn.Module):
    """One activation module called at two resolutions: two levels of one module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.stages = nn.ModuleList([nn.Conv2d(4, 6, 3, stride=2, padding=1)])
        self.act = nn.ReLU()
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.act(self.stages[0](self.act(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_one_naming_rule_for_dict_keys_exported_outputs_and_folders(tmp_path):
    torch.manual_seed(0)
    model = SharedActivation().eval()
    data = _images(tmp_path / "images")
    # the discovered levels are two calls of one module (act), given as an extractor; a dotted module path
    for levels, features, expected in ((None, None, ["act", "act_1"]),
                                       (["stem", "stages.0"], ["stem", "stages.0"], ["stem", "stages_0"])):
        extractor = fxfeat.compile(model, levels=levels, input_size=(3, 32, 32), return_dict=True).eval()
        keys = list(extractor(torch.randn(1, 3, 32, 32)))
        assert keys == export.output_names(extractor) == expected
        as_list = fxfeat.compile(model, levels=levels, input_size=(3, 32, 32))
        assert export.output_names(as_list) == keys
        out = tmp_path / "-".join(keys)
        chosen = {} if features is None else {"features": features}
        summary = fxfeat.extract(as_list if features is None else model, data, out, **chosen,
                                 **{**FAST, "input_size": (3, 32, 32)})
        assert list(summary.features) == keys
        assert sorted(path.name for path in out.iterdir() if path.is_dir() and path.name[0] != ".") == \
            sorted([*keys, "metadata"])


def test_extract_traces_and_analyses_the_model_once(monkeypatch):
    calls = []
    trace_modes = api.trace_modes
    monkeypatch.setattr(api, "trace_modes", lambda *args, **kwargs: calls.append(1) or trace_modes(*args, **kwargs))
    extractor, specs = build_extractor(Tiny().eval(), ["pooled", "features", "stage"], input_size=(3, 32, 32),
                                       out_indices=(0,))
    assert len(calls) == 1 and [spec.name for spec in specs] == ["pooled", "stem", "stage"]


def test_compile_inspected_gives_what_inspect_and_compile_give():
    torch.manual_seed(0)
    model = Tiny().eval()
    report, extractor = api.compile_inspected(model, lambda report: [level.node for level in report.levels],
                                              input_size=(3, 32, 32), out_indices=1)
    assert report == fxfeat.inspect(model, input_size=(3, 32, 32), out_indices=1)
    alone = fxfeat.compile(model, levels=[level.node for level in report.levels], input_size=(3, 32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(extractor.eval()(x), alone(x)))
    assert extractor.feature_info.get_dicts() == alone.feature_info.get_dicts()


def test_a_run_in_which_every_image_fails_is_an_error(tmp_path):
    data = _images(tmp_path / "images", broken=True)
    with pytest.raises(fxfeat.ExtractError, match=r"no image could be read: .* 3 images tried \(first: .*0\.png: "):
        fxfeat.extract(Tiny().eval(), data, tmp_path / "out", **FAST)
    result = subprocess.run(
        [sys.executable, "-m", "fxfeat", "extract", "torchvision:resnet18", str(data), "--out", str(tmp_path / "cli"),
         "--weights", "random", "--input-size", "3", "64", "64", "--workers", "0", "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0 and "no image could be read" in result.stderr, result.stderr[-2000:]
    assert "images written" not in result.stdout
