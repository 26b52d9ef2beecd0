"""``fxfeat.extract``: every data source through the API and the CLI, features equal to the extractor's outputs,
the model's own preprocessing, exactly-once writing across crashes, damage, restarts and process counts."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import fxfeat
from fxfeat.extraction.decode import decode
from fxfeat.extraction.preprocess import resolve_preprocessing
from fxfeat.extraction.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(48, 64), (60, 45), (33, 70), (64, 64), (120, 90)]  # (height, width)


def _picture(index: int, height: int, width: int) -> Image.Image:
    """A smooth random picture (JPEG-friendly, like a photo)."""
    rng = np.random.default_rng(index)
    coarse = (rng.random((height // 8 + 1, width // 8 + 1, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.BICUBIC)


def make_folder(root: Path, count: int = 12, broken: bool = False) -> Path:
    """``count`` JPEGs of mixed sizes in two class folders (``a``, ``b``), optionally one broken file."""
    for index in range(count):
        folder = root / ("a" if index % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        _picture(index, *SIZES[index % len(SIZES)]).save(folder / f"{index:03d}.jpg", quality=92)
    if broken:
        (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


# float32 compute: rows compared with the extractor's own outputs, and no timed probe deciding a test's rows
FAST = dict(input_size=(3, 64, 64), num_workers=0, progress=False, batch_size=4, compute_dtype=torch.float32)


def preprocessed(model: nn.Module, paths: list[str], input_size=(3, 64, 64)) -> torch.Tensor:
    """The batch the extractor sees, computed here from the files: decode, the model's resize/crop, normalise."""
    steps = resolve_preprocessing(model, input_size)
    images = [steps(decode(torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)))
              for path in paths]
    return steps.normalize(torch.stack(images))


def test_features_from_one_pass_equal_the_extractors_outputs(tmp_path):
    data = make_folder(tmp_path / "images", count=10)
    model = small_model()
    summary = fxfeat.extract(model, data, tmp_path / "out", features=["pooled", "unpooled", "features", "layer2"],
                             out_indices=(1, 3), pool={"layer2": "avg"}, dtype=torch.float32, optimize=False,
                             shard_size=4, **FAST)
    assert summary.images == 10 and summary.parts_written == 3 and summary.complete
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    assert list(arrays) == ["pooled", "unpooled", "layer1", "layer3", "layer2"]
    x = preprocessed(model, list(metadata["path"]))
    with torch.no_grad():
        pooled = fxfeat.compile(model, mode="pooled").eval()(x)
        unpooled = fxfeat.compile(model, mode="unpooled", input_size=(3, 64, 64)).eval()(x)
        layer1, layer2, layer3 = fxfeat.compile(model, out_indices=(1, 2, 3), input_size=(3, 64, 64)).eval()(x)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["pooled"])), pooled)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["unpooled"])), unpooled)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["layer1"])), layer1)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["layer3"])), layer3)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["layer2"])), layer2.mean(dim=(2, 3)))
    # the default: optimize_for_inference, float16 rows
    fxfeat.extract(model, data, tmp_path / "fast", features=["pooled", "features"], out_indices=(1, 3), **FAST)
    fast, _ = fxfeat.load_features(tmp_path / "fast")
    assert fast["pooled"].dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(np.asarray(fast["pooled"])).float(), pooled, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(torch.from_numpy(np.asarray(fast["layer3"])).float(), layer3, rtol=2e-3, atol=2e-3)


def test_metadata_rows_in_dataset_order_with_labels_and_sizes(tmp_path):
    data = make_folder(tmp_path / "images", count=7)
    fxfeat.extract(small_model(), data, tmp_path / "out", shard_size=3, **FAST)
    _, metadata = fxfeat.load_features(tmp_path / "out")
    files = sorted(str(path.relative_to(data)) for path in data.rglob("*.jpg"))
    assert list(metadata["id"]) == list(range(7))
    assert [os.path.relpath(path, data) for path in metadata["path"]] == files
    assert list(metadata["label"]) == [0 if name.startswith("a/") else 1 for name in files]
    for _, row in metadata.iterrows():
        assert Image.open(row["path"]).size == (row["width"], row["height"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["data"]["classes"] == ["a", "b"]
    assert [part["rows"] for part in manifest["parts"]] == [[0, 3], [3, 6], [6, 7]]


def _tar_shards(folder: Path, paths: list[Path], per_shard: int) -> str:
    folder.mkdir()
    for shard in range(0, len(paths), per_shard):
        with tarfile.open(folder / f"train-{shard // per_shard:03d}.tar", "w") as archive:
            for index, path in enumerate(paths[shard: shard + per_shard], start=shard):
                archive.add(path, arcname=f"sample{index:04d}.jpg")
                label = f"{index % 5}".encode()
                info = tarfile.TarInfo(f"sample{index:04d}.cls")
                info.size = len(label)
                archive.addfile(info, io.BytesIO(label))
    return str(folder / f"train-{{000..{(len(paths) - 1) // per_shard:03d}}}.tar")


class _TupleDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return Image.open(self.paths[index]).convert("RGB"), index % 5


def test_every_data_source_gives_the_same_features(tmp_path):
    data = make_folder(tmp_path / "images", count=9)
    paths = sorted(data.rglob("*.jpg"))
    model = small_model()
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(str(path.relative_to(tmp_path)) for path in paths))
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{path},{i % 5}\n" for i, path in enumerate(paths)))
    pattern = _tar_shards(tmp_path / "shards", paths, per_shard=4)
    sources = {"folder": data, "txt": tmp_path / "list.txt", "csv": tmp_path / "list.csv", "tar": pattern,
               "dataset": _TupleDataset(paths)}
    results = {}
    for name, source in sources.items():
        summary = fxfeat.extract(model, source, tmp_path / name, shard_size=4, **FAST)
        assert summary.images == 9, name
        results[name] = fxfeat.load_features(tmp_path / name)
    reference = np.asarray(results["folder"][0]["pooled"])
    for name, (arrays, metadata) in results.items():
        np.testing.assert_array_equal(np.asarray(arrays["pooled"]), reference, err_msg=name)
        assert list(metadata["id"]) == list(range(9)), name
    assert list(results["csv"][1]["label"]) == [i % 5 for i in range(9)]
    assert list(results["tar"][1]["label"]) == [i % 5 for i in range(9)]
    assert list(results["dataset"][1]["label"]) == [i % 5 for i in range(9)]
    assert results["tar"][1]["path"][0] == "train-000.tar/sample0000"
    assert list(results["txt"][1]["path"]) == [str(path) for path in paths]


def test_hugging_face_dataset_in_torch_format(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = make_folder(tmp_path / "images", count=5)
    paths = sorted(data.rglob("*.jpg"))
    table = datasets.Dataset.from_dict({"image": [str(path) for path in paths], "label": [3, 1, 4, 1, 5]})
    table = table.cast_column("image", datasets.Image()).with_format("torch")
    model = small_model()
    fxfeat.extract(model, table, tmp_path / "hf", **FAST)
    fxfeat.extract(model, data, tmp_path / "folder", **FAST)
    (hf, hf_metadata), (folder, _) = fxfeat.load_features(tmp_path / "hf"), fxfeat.load_features(tmp_path / "folder")
    np.testing.assert_array_equal(np.asarray(hf["pooled"]), np.asarray(folder["pooled"]))
    assert list(hf_metadata["label"]) == [3, 1, 4, 1, 5] and hf_metadata["path"].isna().all()


def test_cli_on_folder_list_and_tar_shards(tmp_path):
    data = make_folder(tmp_path / "images", count=6)
    paths = sorted(data.rglob("*.jpg"))
    (tmp_path / "list.txt").write_text("\n".join(map(str, paths)))
    pattern = _tar_shards(tmp_path / "shards", paths, per_shard=4)
    for name, source in (("folder", data), ("list", tmp_path / "list.txt"), ("tar", pattern)):
        result = subprocess.run(
            [sys.executable, "-m", "fxfeat", "extract", "torchvision:resnet18", str(source), "--out",
             str(tmp_path / name), "--weights", "random", "--features", "pooled,-1", "--pool", "avg",
             "--input-size", "3", "64", "64", "--workers", "1", "--shard-size", "4", "--quiet",
             "--compute-dtype", "float32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "6 images written" in result.stdout, result.stdout
    arrays = [fxfeat.load_features(tmp_path / name)[0] for name in ("folder", "list", "tar")]
    for other in arrays[1:]:
        for feature in ("pooled", "layer4"):
            np.testing.assert_array_equal(np.asarray(other[feature]), np.asarray(arrays[0][feature]))
    assert arrays[0]["layer4"].shape == (6, 512)  # pooled by --pool avg
    torch.manual_seed(0)  # the CLI's random weights are seed 0's: the same as the API's
    model = torchvision.models.resnet18().eval()
    fxfeat.extract(model, data, tmp_path / "api", features=["pooled", -1], pool="avg", **FAST)
    np.testing.assert_array_equal(np.asarray(fxfeat.load_features(tmp_path / "api")[0]["pooled"]),
                                  np.asarray(arrays[0]["pooled"]))


def test_default_preprocessing_is_timms_eval_transform():
    timm = pytest.importorskip("timm")
    picture = _picture(0, 300, 500)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95)
    encoded = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    # four resize/crop rules: crop_pct 0.875 bicubic, 0.95, squash at 1.0, a non-square input size
    for name, kwargs in (("resnet18", {}), ("resnet50", {}), ("vit_tiny_patch16_224.augreg_in21k", {}),
                         ("convnext_atto", {}), ("deit_tiny_patch16_224", {})):
        model = timm.create_model(name, pretrained=False, **kwargs)
        config = timm.data.resolve_data_config(model=model)
        steps = resolve_preprocessing(model)
        assert steps.size == tuple(config["input_size"][1:]) and steps.interpolation == config["interpolation"]
        assert steps.mean == tuple(config["mean"]) and steps.std == tuple(config["std"])
        reference = timm.data.create_transform(**config)(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        assert_same_as_pil_pipeline(steps.normalize(steps(decode(encoded))[None])[0], reference, name)


def assert_same_as_pil_pipeline(ours: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    """Equal but for torchvision's uint8 antialiased resize, which rounds as PIL's does except for under 1% of the
    values, by one or two levels (measured: 0.3-0.7% by one level, a handful by two)."""
    assert ours.shape == reference.shape, name
    level = (1 / 255) / 0.224 + 1e-6  # one intensity level after normalising by the smallest std used here
    difference = (ours - reference).abs()
    assert difference.max() <= 2 * level, (name, difference.max())
    assert (difference > 1e-5).float().mean() < 0.01, name


def test_torchvision_and_hugging_face_preprocessing(tmp_path):
    transforms = torchvision.models.get_model_weights("efficientnet_b3").DEFAULT.transforms()
    steps = resolve_preprocessing(torchvision.models.efficientnet_b3(), spec="torchvision:efficientnet_b3")
    assert (steps.size, steps.resize, steps.interpolation) == ((300, 300), (320,), "bicubic")
    encoded = _jpeg(_picture(1, 200, 330))
    image = decode(torch.frombuffer(bytearray(encoded), dtype=torch.uint8))
    reference = transforms(Image.open(io.BytesIO(encoded)).convert("RGB"))  # on a PIL image, as ImageFolder loads
    assert_same_as_pil_pipeline(steps.normalize(steps(image)[None])[0], reference, "efficientnet_b3")
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64)
    transformers.ViTModel(config).save_pretrained(tmp_path / "vit")
    processor = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path / "vit")
    model = fxfeat.models.build_model(f"hf:{tmp_path / 'vit'}", weights="pretrained")
    steps = resolve_preprocessing(model, spec=f"hf:{tmp_path / 'vit'}")
    assert (steps.size, steps.resize_mode, steps.mean) == ((32, 32), "exact", (0.5, 0.5, 0.5))
    reference = processor(Image.fromarray(image.permute(1, 2, 0).numpy()), return_tensors="pt")["pixel_values"][0]
    assert_same_as_pil_pipeline(steps.normalize(steps(image)[None])[0], reference, "hugging face")
    summary = fxfeat.extract(f"hf:{tmp_path / 'vit'}", make_folder(tmp_path / "images", 3), tmp_path / "out",
                             features="unpooled", progress=False, num_workers=0)
    assert summary.features == {"unpooled": (32, 4, 4)}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    source = manifest["config"]["preprocessing"]["source"]
    assert source.startswith("transformers AutoImageProcessor: ViTImageProcessor")


def _jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_image_modes_are_converted_to_the_models_channels(tmp_path):
    picture = _picture(2, 40, 50)
    folder = tmp_path / "modes"
    folder.mkdir()
    picture.convert("L").save(folder / "1-gray.png")
    picture.convert("RGBA").save(folder / "2-rgba.png")
    picture.convert("CMYK").save(folder / "3-cmyk.jpg", quality=95)
    deep = (np.asarray(picture.convert("L"), dtype=np.uint16) * 257)
    Image.fromarray(deep).save(folder / "4-deep.png")
    picture.save(folder / "5-rgb.bmp")
    sources = sorted(folder.iterdir())
    for path in sources:
        decoded = decode(torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8), channels=3)
        expected = np.asarray(Image.open(path).convert("RGB")) if "deep" not in path.name else \
            np.repeat(np.asarray(picture.convert("L"))[..., None], 3, axis=2)
        assert decoded.shape == (3, 40, 50), path.name
        np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), expected, err_msg=path.name)
    gray = decode(torch.frombuffer(bytearray((folder / "5-rgb.bmp").read_bytes()), dtype=torch.uint8), channels=1)
    np.testing.assert_array_equal(gray[0].numpy(), np.asarray(picture.convert("L")))
    # a one-channel model takes every mode, normalised with the mean of the three-channel values
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", in_chans=1, pretrained=False).eval()
    summary = fxfeat.extract(model, folder, tmp_path / "out", **{**FAST, "input_size": None})
    assert summary.images == 5 and not summary.skipped
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["preprocessing"]["mean"] == [pytest.approx(sum((0.485, 0.456, 0.406)) / 3)]


def test_a_corrupt_image_is_recorded_or_raised(tmp_path):
    data = make_folder(tmp_path / "images", count=5, broken=True)
    summary = fxfeat.extract(small_model(), data, tmp_path / "out", **FAST)
    assert summary.images == 5 and len(summary.skipped) == 1
    index, path, reason = summary.skipped[0]
    assert path.endswith("broken.jpg") and "readable" in reason
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    assert len(arrays["pooled"]) == 5 and index not in set(metadata["id"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == [{"id": index, "path": path, "reason": reason}]
    with pytest.raises(fxfeat.ExtractError, match="broken.jpg"):
        fxfeat.extract(small_model(), data, tmp_path / "raise", on_error="raise", **FAST)


def test_a_damaged_part_is_redone_and_the_rest_kept(tmp_path):
    data = make_folder(tmp_path / "images", count=10)
    model = small_model()
    fxfeat.extract(model, data, tmp_path / "out", shard_size=3, **FAST)
    before, _ = fxfeat.load_features(tmp_path / "out")
    before = np.asarray(before["pooled"]).copy()
    damaged = tmp_path / "out" / "pooled" / "part-00002.npy"
    content = bytearray(damaged.read_bytes())
    content[-1] ^= 0xFF
    damaged.write_bytes(bytes(content))
    (tmp_path / "out" / "metadata" / "part-00000.parquet").unlink()
    summary = fxfeat.extract(model, data, tmp_path / "out", shard_size=3, **FAST)
    assert (summary.parts_written, summary.parts_kept, summary.images) == (2, 2, 6)
    after, metadata = fxfeat.load_features(tmp_path / "out", verify=True)
    np.testing.assert_array_equal(np.asarray(after["pooled"]), before)
    assert list(metadata["id"]) == list(range(10))
    again = fxfeat.extract(model, data, tmp_path / "out", shard_size=3, **FAST)
    assert (again.parts_written, again.parts_kept, again.images) == (0, 4, 0)


_SLOW_RUN = """
import sys, time, torch, torchvision, fxfeat
sys.path.insert(0, {tests!r})
from test_extract import _TupleDataset
from pathlib import Path

class Slow(_TupleDataset):
    def __getitem__(self, index):
        time.sleep(0.05)
        return super().__getitem__(index)

torch.manual_seed(0)
model = torchvision.models.resnet18().eval()
paths = sorted(Path({data!r}).rglob("*.jpg"))
summary = fxfeat.extract(model, Slow(paths), {out!r}, shard_size=2, batch_size=1, num_workers=0, progress=False,
                         input_size=(3, 64, 64), compute_dtype=torch.float32)
print(summary.parts_written, summary.parts_kept)
"""


def test_a_killed_run_resumes_with_only_the_missing_parts(tmp_path):
    data = make_folder(tmp_path / "images", count=16)
    script = tmp_path / "run.py"
    script.write_text(_SLOW_RUN.format(tests=str(ROOT / "tests"), data=str(data), out=str(tmp_path / "out")))
    records = tmp_path / "out" / ".fxfeat" / "parts"
    process = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and len(list(records.glob("*.json"))) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # a hard crash: no cleanup runs
    process.wait()
    done = len(list(records.glob("*.json")))
    assert 3 <= done < 8, "the run finished before it was killed: slow it down"
    with pytest.raises(fxfeat.OutputDirectoryError, match="incomplete"):
        fxfeat.load_features(tmp_path / "out")
    rerun = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    written, kept = map(int, rerun.stdout.split()[-2:])
    assert kept >= done and written + kept == 8  # a part being written when killed is redone, nothing twice
    assert not list((tmp_path / "out" / ".fxfeat" / "tmp").glob("*"))  # the crash's temporary files are gone
    arrays, metadata = fxfeat.load_features(tmp_path / "out", verify=True)
    assert list(metadata["id"]) == list(range(16))
    paths = sorted(data.rglob("*.jpg"))
    fxfeat.extract(small_model(), _TupleDataset(paths), tmp_path / "whole", shard_size=2,
                   **{**FAST, "batch_size": 1})  # oneDNN's rounding depends on the batch size
    np.testing.assert_array_equal(np.asarray(arrays["pooled"]),
                                  np.asarray(fxfeat.load_features(tmp_path / "whole")[0]["pooled"]))


def test_two_processes_under_torchrun_write_the_rows_of_one(tmp_path):
    data = make_folder(tmp_path / "images", count=11, broken=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fxfeat",
               "extract", "torchvision:resnet18", str(data), "--weights", "random", "--input-size", "3", "64", "64",
               "--features", "pooled,layer3", "--pool", "layer3=max", "--workers", "1", "--quiet",
               "--compute-dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*command, "--out", str(tmp_path / "two"), "--shard-size", "3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("images written") == 1, two.stdout  # the summary printed once, by rank 0
    one = subprocess.run([sys.executable, *command[command.index("-m", 2):], "--out", str(tmp_path / "one"),
                          "--shard-size", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    (a, a_meta), (b, b_meta) = fxfeat.load_features(tmp_path / "two"), fxfeat.load_features(tmp_path / "one")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["complete"] and [entry["path"] for entry in manifest["skipped"]] == [str(data / "a/broken.jpg")]
    broken = manifest["skipped"][0]["id"]
    assert a_meta.equals(b_meta) and list(a_meta["id"]) == sorted(set(range(12)) - {broken})
    for name in ("pooled", "layer3"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
    assert {part["run"]["rank"] for part in manifest["parts"]} == {0, 1}
    # a rerun with one process finds everything done; a damaged part is redone by whichever rank takes it
    (tmp_path / "two" / "pooled" / "part-00001.npy").unlink()
    rerun = subprocess.run([*command, "--out", str(tmp_path / "two"), "--shard-size", "3"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "1 parts written, 3 kept" in rerun.stdout, rerun.stdout + rerun.stderr[-2000:]


def test_the_manifest_refuses_another_configuration(tmp_path):
    data = make_folder(tmp_path / "images", count=3)
    model = small_model()
    fxfeat.extract(model, data, tmp_path / "out", **FAST)
    with pytest.raises(fxfeat.OutputDirectoryError, match=r"features\.unpooled|features.*pooled") as error:
        fxfeat.extract(model, data, tmp_path / "out", features="unpooled", **FAST)
    assert "overwrite" in str(error.value)
    other = small_model()
    with torch.no_grad():
        other.fc.weight.add_(1)
    with pytest.raises(fxfeat.OutputDirectoryError, match="model.weights_sha256"):
        fxfeat.extract(other, data, tmp_path / "out", **FAST)
    with pytest.raises(fxfeat.OutputDirectoryError, match="preprocessing"):
        fxfeat.extract(model, data, tmp_path / "out", **{**FAST, "input_size": (3, 72, 72)})
    _picture(99, 40, 40).save(data / "a" / "new.jpg")
    with pytest.raises(fxfeat.OutputDirectoryError, match="data"):
        fxfeat.extract(model, data, tmp_path / "out", **FAST)
    summary = fxfeat.extract(model, data, tmp_path / "out", features="unpooled", overwrite=True, **FAST)
    assert summary.images == 4 and summary.features == {"unpooled": (512, 2, 2)}
    assert sorted(os.listdir(tmp_path / "out")) == [".fxfeat", "manifest.json", "metadata", "unpooled"]
    with pytest.raises(fxfeat.OutputDirectoryError, match="resume=False"):
        fxfeat.extract(model, data, tmp_path / "out", features="unpooled", resume=False, **FAST)


def test_a_rerun_from_another_path_to_the_same_data_resumes(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "images", count=5)
    fxfeat.extract(small_model(), data, tmp_path / "out", shard_size=2, **FAST)
    (tmp_path / ".fxfeat-moved").mkdir()
    data.rename(tmp_path / ".fxfeat-moved" / "images")
    monkeypatch.chdir(tmp_path / ".fxfeat-moved")
    summary = fxfeat.extract(small_model(), "images", tmp_path / "out", shard_size=2, **FAST)
    assert (summary.parts_written, summary.parts_kept) == (0, 3)


def test_bad_input_gets_a_clear_error(tmp_path):
    data = make_folder(tmp_path / "images", count=2)
    model = small_model()
    (tmp_path / "empty").mkdir()
    cases = [
        (dict(data=tmp_path / "missing"), fxfeat.DataSourceError, "does not exist"),
        (dict(data=tmp_path / "empty"), fxfeat.DataSourceError, "holds no images"),
        (dict(data=iter([1])), fxfeat.DataSourceError, "cannot read images"),
        (dict(model="timm:resnet_does_not_exist"), fxfeat.InvalidModelError, "no model named"),
        (dict(model="no_such_package.models:net"), fxfeat.InvalidModelError, "Cannot import"),
        (dict(features="scores"), fxfeat.UnknownLevelError, "scores"),
        (dict(features=["pooled", "pooled"]), fxfeat.InvalidRequestError, "more than once"),
        (dict(features=9), fxfeat.OutIndicesError, "level 9"),
        (dict(pool="median"), fxfeat.InvalidRequestError, "pool"),
        (dict(pool={"pooled": "avg"}), fxfeat.InvalidRequestError, "already a vector"),
        (dict(on_error="ignore"), fxfeat.InvalidRequestError, "on_error"),
        (dict(dtype=torch.int8), fxfeat.InvalidRequestError, "dtype"),
        (dict(batch_size=0), fxfeat.InvalidRequestError, "batch_size"),
        (dict(data=[torch.randn(3, 8, 8)]), fxfeat.DataSourceError, "preprocessed already"),  # normalised items
        (dict(data=[{"picture": 1}]), fxfeat.DataSourceError, "none of them is an image"),
    ]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), fxfeat.InvalidRequestError, "no CUDA device"))
    for change, error, message in cases:
        arguments = {"model": model, "data": data, **FAST, **change}
        with pytest.raises(error, match=message):
            fxfeat.extract(arguments.pop("model"), arguments.pop("data"), tmp_path / "out", **arguments)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(fxfeat.OutputDirectoryError, match="other files"):
        fxfeat.extract(model, data, tmp_path / "taken", **FAST)
    with pytest.raises(fxfeat.OutputDirectoryError, match="other files"):
        fxfeat.extract(model, data, tmp_path / "taken", overwrite=True, **FAST)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(fxfeat.OutputDirectoryError, match="not an fxfeat extraction"):
        fxfeat.load_features(tmp_path / "taken")
    with pytest.raises(fxfeat.OutputDirectoryError, match="is a file"):
        fxfeat.extract(model, data, tmp_path / "taken" / "notes.txt", **FAST)


def test_named_models_weights_and_the_unreachable_network(tmp_path, monkeypatch):
    with pytest.raises(fxfeat.WeightsUnavailableError, match="--weights PATH"):
        fxfeat.models.build_model("torchvision:resnet18", weights="pretrained")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the constant is what stops its download retries
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(fxfeat.WeightsUnavailableError, match="--weights PATH"):
        fxfeat.models.build_model("timm:resnet18", weights="pretrained")
    trained = small_model()
    with torch.no_grad():
        trained.fc.bias.fill_(0.5)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ckpt.pth")
    loaded = fxfeat.models.build_model("torchvision:resnet18", weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(loaded.fc.bias, trained.fc.bias)
    with pytest.raises(fxfeat.WeightsUnavailableError, match="does not fit"):
        fxfeat.models.build_model("torchvision:resnet34", weights=str(tmp_path / "ckpt.pth"))
    factory = fxfeat.models.build_model("torchvision.models:resnet18")  # package.module:factory
    assert isinstance(factory, torchvision.models.ResNet)


def test_the_model_is_not_changed_and_an_extractor_works_as_model(tmp_path):
    data = make_folder(tmp_path / "images", count=4)
    model = small_model().train()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    summary = fxfeat.extract(model, data, tmp_path / "out", **FAST)
    assert model.training and all(module.training for module in model.modules())
    assert all(torch.equal(state[name], value) for name, value in model.state_dict().items())
    assert all(parameter.requires_grad for parameter in model.parameters())
    extractor = fxfeat.compile(model.eval(), mode="pooled")
    again = fxfeat.extract(extractor, data, tmp_path / "from_extractor", **FAST)
    assert again.features == summary.features == {"pooled": (512,)}
    np.testing.assert_array_equal(np.asarray(fxfeat.load_features(tmp_path / "out")[0]["pooled"]),
                                  np.asarray(fxfeat.load_features(tmp_path / "from_extractor")[0]["pooled"]))


def test_a_vit_writes_token_maps_and_pooled_features_with_workers(tmp_path):
    timm = pytest.importorskip("timm")
    data = make_folder(tmp_path / "images", count=6, broken=True)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    summary = fxfeat.extract(model, data, tmp_path / "out", features=["pooled", "features"], out_indices=(-1,),
                             num_workers=2, batch_size=4, progress=False, dtype=torch.float32, optimize=False,
                             input_size=(3, 64, 64))  # timm keeps the 224 of its pretrained_cfg
    assert summary.features == {"pooled": (192,), "blocks_11": (192, 4, 4)} and summary.images == 6
    arrays, metadata = fxfeat.load_features(tmp_path / "out")
    x = preprocessed(model, list(metadata["path"]), (3, 64, 64))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(torch.from_numpy(np.asarray(arrays["pooled"])), pooled)


def test_embedding_reader_reads_the_output(tmp_path):
    embedding_reader = pytest.importorskip("embedding_reader")
    data = make_folder(tmp_path / "images", count=7)
    fxfeat.extract(small_model(), data, tmp_path / "out", shard_size=3, **FAST)
    reader = embedding_reader.EmbeddingReader(
        embeddings_folder=str(tmp_path / "out" / "pooled"), metadata_folder=str(tmp_path / "out" / "metadata"),
        meta_columns=["id", "path"], file_format="parquet_npy")
    embeddings, metadata = next(iter(reader(batch_size=100, start=0, end=reader.count, show_progress=False)))
    arrays, ours = fxfeat.load_features(tmp_path / "out")
    np.testing.assert_array_equal(embeddings, np.asarray(arrays["pooled"]).astype(np.float32))
    assert list(metadata["id"]) == list(ours["id"])
    assert open_source(str(data)).describe()["count"] == reader.count


def test_the_weights_preprocessing_size_is_the_size_compiled_for(tmp_path):
    """torchvision's efficientnet_b3 weights are for 300x300 crops of a 320 resize: the images are preprocessed so
    and the extractor is compiled at 300 (its rows have the shapes of a 300 probe), not at the 224 default probe."""
    data = make_folder(tmp_path / "images", count=3)
    summary = fxfeat.extract("torchvision:efficientnet_b3", data, tmp_path / "out", weights="random",
                             features=["pooled", -1], progress=False, num_workers=0)
    preprocessing = json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["preprocessing"]
    assert (preprocessing["size"], preprocessing["resize"]) == ([300, 300], [320])
    assert preprocessing["source"] == "torchvision EfficientNet_B3_Weights.IMAGENET1K_V1 transforms()"
    (level,) = [name for name in summary.features if name != "pooled"]
    assert summary.features[level][1:] == (10, 10)  # ceil(300 / 32); a 224 probe gives 7 x 7
    assert np.asarray(fxfeat.load_features(tmp_path / "out")[0][level]).shape[1:] == summary.features[level]


def test_a_model_built_for_another_size_than_its_preprocessing_keeps_its_own(tmp_path):
    """timm's preprocessing of a ViT built for 64x64 still says 224 (its pretrained_cfg): the model does not run at
    224, so the extractor is compiled at 64 and timm is asked for its preprocessing at 64, with a warning."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    data = make_folder(tmp_path / "images", count=2)
    with pytest.warns(fxfeat.FxFeatWarning, match="does not run at the size its preprocessing .* makes, 224x224"):
        summary = fxfeat.extract(model, data, tmp_path / "out", features="unpooled", progress=False, num_workers=0)
    assert summary.features == {"unpooled": (192, 4, 4)}
    preprocessing = json.loads((tmp_path / "out" / "manifest.json").read_text())["config"]["preprocessing"]
    config = dict(timm.data.resolve_model_data_config(model), input_size=(3, 64, 64))
    reference = timm.data.create_transform(**config).transforms  # resize to 64 / crop_pct, centre crop 64
    assert (preprocessing["size"], preprocessing["resize"]) == ([64, 64], [reference[0].size])
