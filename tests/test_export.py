"""Export: TorchScript (script and trace), ONNX (named outputs, feature_info in the metadata, dynamic sizes) and
torch.export, each compared here with the eager extractor, independently of the check the export runs itself."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import fxfeat
from fxfeat import export
from fxfeat.export.onnx_model import rename_outputs
from tests.conftest import timm_model
from tests.helpers import as_list

onnxruntime = pytest.importorskip("onnxruntime")

SECOND_SIZE = (3, 3, 160, 224)  # another batch and another height and width than the compile size


def _eager(extractor, x, grad: bool = False) -> list[torch.Tensor]:
    extractor.eval()
    with torch.set_grad_enabled(grad):
        outputs = extractor(x)
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else as_list(outputs)
    return [output.detach() for output in outputs]


def _onnx_outputs(path, x) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(output) for output in session.run(None, {"image": x.numpy()})]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """1e-4 relative, with an absolute floor of 1e-5 + 1e-4 x the output's largest magnitude."""
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-4,
                               atol=1e-5 + 1e-4 * expected.abs().max().item())


def _outputs(value) -> list[torch.Tensor]:
    return [value] if isinstance(value, torch.Tensor) else as_list(value)


def _check_every_format(extractor, tmp_path, sizes, spatial_dynamic: bool = True) -> None:
    """TorchScript (script, trace) and torch.export equal to eager, ONNX Runtime allclose (1e-4 relative), at
    every size the export says it accepts; with ``spatial_dynamic``, every export accepts them all."""
    program, program_report = export.to_exported_program(extractor, return_report=True)
    onnx_report = export.to_onnx(extractor, tmp_path / "model.onnx")
    runs = {
        "script": export.to_torchscript(extractor, "script", return_report=True),
        "trace": export.to_torchscript(extractor, "trace", return_report=True),
        "torch.export": (program.module(), program_report),
        "onnx": (lambda x: _onnx_outputs(tmp_path / "model.onnx", x), onnx_report),
    }
    for x in sizes:
        changed = {"batch"} if x.shape[0] != 2 else set()
        changed |= {"height", "width"} if tuple(x.shape[-2:]) != tuple(extractor.input_size[1:]) else set()
        if not any(changed <= set(report.dynamic) for _, report in runs.values()):
            continue  # no export takes it (a fixed grid: the eager extractor does not run there either)
        expected = _eager(extractor, x)
        for name, (run, report) in runs.items():
            if not changed <= set(report.dynamic):
                continue
            with torch.no_grad():
                actual = run(x)
            if name == "script":  # a list stays a list, a dict a dict, a tensor a tensor
                assert type(actual) is type(extractor(x))
            actual = _outputs(actual)
            assert len(actual) == len(expected), name
            # nn.MultiheadAttention takes a fused path in eager without autograd, which no exporter records;
            # torch.export keeps the other one, so it is compared with eager on that path.
            reference = expected if name != "torch.export" else _eager(extractor, x, grad=True)
            for a, b in zip(actual, reference):
                if name == "onnx":
                    _assert_close(a, b)
                else:
                    assert torch.equal(a, b), name
    if spatial_dynamic:
        assert all(report.dynamic == ("batch", "height", "width") for _, report in runs.values())


def test_resnet_features_export_to_every_format_with_dynamic_sizes(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    extractor = fxfeat.compile(model, input_size=(3, 128, 128))
    _check_every_format(extractor, tmp_path, [torch.randn(2, 3, 128, 128), torch.randn(*SECOND_SIZE)])


@pytest.mark.parametrize("kwargs", [dict(mode="pooled"), dict(mode="unpooled"), dict(output_stride=16),
                                    dict(return_dict=True)])
def test_modes_export(kwargs, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    extractor = fxfeat.compile(model, input_size=(3, 128, 128), **kwargs)
    _check_every_format(extractor, tmp_path, [torch.randn(2, 3, 128, 128), torch.randn(*SECOND_SIZE)])


@pytest.mark.parametrize("exporter", [None, "torchscript"])
def test_onnx_names_outputs_and_keeps_feature_info(tmp_path, exporter):
    # The TorchScript-based exporter read output names from the fx module's graph as from a TorchScript one
    # ("'Graph' object has no attribute 'outputs'"), so it failed wherever an axis was dynamic.
    extractor = fxfeat.compile(torchvision.models.resnet18().eval(), out_indices=(1, 3), input_size=(3, 96, 96))
    path = tmp_path / "resnet.onnx"
    report = export.to_onnx(extractor, path, exporter=exporter)
    assert report.exporter == (exporter or report.exporter) and set(report.dynamic) == {"batch", "height", "width"}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["layer1", "layer3"] == list(report.output_names)
    assert [item.name for item in session.get_inputs()] == ["image"]
    info = export.read_onnx_feature_info(path)
    assert info.get_dicts() == extractor.feature_info.get_dicts() and info.out_indices == (1, 3)
    assert export.read_feature_info(path).channels() == [64, 256]
    assert report.exporter in ("dynamo", "torchscript") and len(report.checks) == 3


def test_output_names_never_clash_with_internal_values(tmp_path):
    # Exporters name values after the fx nodes; an output named like one of them (torchvision Swin's unpooled
    # output is the node `permute`) made ONNX Runtime reject the model as having a duplicate definition.
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["permute"]), helper.make_node("Neg", ["permute"], ["out0"]),
         helper.make_node("Abs", ["permute"], ["out1"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("out0", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("out1", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    rename_outputs(model.graph, ["out1", "permute"])  # swapped names, and one taken inside
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "renamed.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "renamed.onnx"), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["out1", "permute"]
    negated, absolute = session.run(None, {"image": np.array([-1.0, 2.0], dtype=np.float32)})
    assert negated.tolist() == [-0.0, -2.0] and absolute.tolist() == [0.0, 2.0]


def test_torchscript_and_exported_program_files_keep_feature_info(tmp_path):
    extractor = fxfeat.compile(torchvision.models.resnet18().eval(), mode="pooled", input_size=(3, 64, 64))
    export.to_torchscript(extractor, path=tmp_path / "model.pt")
    export.to_exported_program(extractor, path=tmp_path / "model.pt2")
    for path in ("model.pt", "model.pt2"):
        assert export.read_feature_info(tmp_path / path).get_dicts() == extractor.feature_info.get_dicts()
    x = torch.randn(2, 3, 80, 96)
    assert torch.equal(torch.jit.load(tmp_path / "model.pt")(x), _eager(extractor, x)[0])
    assert torch.equal(torch.export.load(tmp_path / "model.pt2").module()(x), _eager(extractor, x)[0])


def test_token_model_with_a_fixed_grid_exports_with_a_dynamic_batch_only(tmp_path, capfd):
    torch.manual_seed(0)
    model = timm_model("vit_tiny_patch16_224")
    extractor = fxfeat.compile(model, out_indices=2)
    with pytest.warns(fxfeat.FxFeatWarning, match="height and width fixed"):
        report = export.to_onnx(extractor, tmp_path / "vit.onnx")
    assert report.dynamic == ("batch",)
    printed = capfd.readouterr()
    assert "Traceback" not in printed.err + printed.out  # the probe at another size fails quietly
    x = torch.randn(3, 3, 224, 224)
    for a, b in zip(_onnx_outputs(tmp_path / "vit.onnx", x), _eager(extractor, x)):
        _assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxfeat.FxFeatWarning)
        scripted = export.to_torchscript(extractor)
    assert all(torch.equal(a, b) for a, b in zip(scripted(x), _eager(extractor, x)))
    with pytest.raises(torch.jit.Error, match="Input height \\(256\\) doesn't match model"):  # its own check
        scripted(torch.randn(1, 3, 256, 256))


def test_a_shape_checked_extractor_exports_with_its_check():
    from tests.test_trace import SquareOrWide  # branches on h == w: valid at its compile size only

    extractor = fxfeat.compile(SquareOrWide().eval(), input_size=(3, 64, 64))
    with pytest.warns(fxfeat.FxFeatWarning, match="height and width fixed"):
        scripted, report = export.to_torchscript(extractor, return_report=True)
    assert report.dynamic == ("batch",)
    x = torch.randn(3, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(scripted(x), _eager(extractor, x)))
    with pytest.raises(torch.jit.Error, match="InputShapeError"):
        scripted(torch.randn(2, 3, 64, 128))


class _ImageOrDict(nn.Module):
    """A forward annotated to take an image or a dict of inputs (timm's NaFlexViT): the extractor takes an image."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.stage = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]):
        if isinstance(x, dict):
            x = x["image"]
        return self.stage(self.stem(x).relu()).relu().mean((2, 3))


def test_an_image_or_dict_annotation_scripts_as_an_image():
    extractor = fxfeat.compile(_ImageOrDict().eval(), input_size=(3, 32, 32))
    scripted = export.to_torchscript(extractor)
    x = torch.randn(2, 3, 48, 40)
    assert all(torch.equal(a, b) for a, b in zip(scripted(x), _eager(extractor, x)))


def test_exports_leave_the_extractor_as_it_was(tmp_path):
    model = torchvision.models.resnet18().train()
    model.layer1.eval()  # mixed flags, as a user's partly frozen model: each module's flag is restored
    extractor = fxfeat.compile(model, out_indices=(1,), input_size=(3, 64, 64))
    export.to_torchscript(extractor)
    export.to_exported_program(extractor)
    assert extractor.training and model.conv1.training and not model.layer1[0].bn1.training


@torch.library.custom_op("fxfeat_test::scramble", mutates_args=())
def _scramble(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) * 2


@_scramble.register_fake
def _(x):
    return torch.empty_like(x)


class _Unexportable(nn.Module):
    """An op no ONNX exporter knows (a custom op without an ONNX translation)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.down(torch.ops.fxfeat_test.scramble(self.stem(x)))


def test_an_unexportable_op_is_a_clear_error_naming_the_node(tmp_path):
    extractor = fxfeat.compile(_Unexportable().eval(), input_size=(3, 32, 32))
    with pytest.raises(fxfeat.ExportError, match=r"ONNX .*scramble") as error:
        export.to_onnx(extractor, tmp_path / "model.onnx")
    assert "at node scramble" in str(error.value) and "Hint:" in str(error.value)
    # The other formats handle a registered custom op.
    x = torch.randn(2, 3, 40, 48)
    assert all(torch.equal(a, b) for a, b in zip(export.to_exported_program(extractor).module()(x),
                                                 _eager(extractor, x)))


def test_only_fxfeat_extractors_are_exported():
    with pytest.raises(fxfeat.InvalidRequestError, match="fxfeat.compile"):
        export.to_torchscript(torchvision.models.resnet18())


def test_missing_onnx_is_a_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def without_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_onnxruntime)
    extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,), input_size=(3, 64, 64))
    with pytest.raises(fxfeat.MissingDependencyError, match=r"fxfeat\[onnx\]"):
        export.to_onnx(extractor, tmp_path / "model.onnx")


# The matrix: every format, every mode, output_stride=16 where it applies. Under the zoo marker (minutes
# per model for the ONNX and torch.export of the transformers).
ZOO = [("torchvision", "resnet50", True), ("torchvision", "efficientnet_b0", True),
       ("torchvision", "mobilenet_v3_large", True), ("torchvision", "convnext_tiny", True),
       ("torchvision", "regnet_y_400mf", True), ("torchvision", "swin_t", False), ("torchvision", "vit_b_16", False),
       ("timm", "regnety_032", True), ("timm", "efficientnet_b0", True), ("timm", "vit_tiny_patch16_224", False)]


@pytest.mark.zoo
@pytest.mark.parametrize("library, name, dilatable", ZOO, ids=[f"{lib}:{name}" for lib, name, _ in ZOO])
def test_zoo_models_export_in_every_mode(library, name, dilatable, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval() if library == "torchvision" else timm_model(name)
    requests = [{}, dict(mode="unpooled"), dict(mode="pooled")] + ([dict(output_stride=16)] if dilatable else [])
    for kwargs in requests:
        extractor = fxfeat.compile(model, **kwargs)
        size = extractor.input_size
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxfeat.FxFeatWarning)  # fixed grids: batch-only dynamic, stated
            other_size = (size[0], size[1] + 32, size[2] + 64)
            _check_every_format(extractor, tmp_path, [torch.randn(2, *size), torch.randn(3, *size),
                                                      torch.randn(2, *other_size)], spatial_dynamic=False)


# Weights as ONNX external data: protobuf writes no file over 2 GiB, so bigger models keep their weights in
# `<name>.data` beside the .onnx. The fast tests force the layout (external_data=True, or a lower limit); the zoo
# test below exports a real model over 2 GiB.


def _external_locations(path) -> list[tuple[str, int, int]]:
    """Each externally stored weight of the ONNX file ``path``: its file, offset and length, read from the proto."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    infos = [ExternalDataInfo(t) for t in model.graph.initializer if uses_external_data(t)]
    return [(info.location, int(info.offset or 0), int(info.length)) for info in infos]


def _assert_one_data_file(path, report) -> None:
    """The weights lie in ``<path>.data`` only, which holds them once (no stale or appended copy), beside a small
    .onnx; nothing else is left in the directory."""
    data = path.with_name(path.name + ".data")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, data.name])
    assert report.data_path == str(data) and f"(weights in {data})" in str(report)
    stored = _external_locations(path)
    assert {location for location, _, _ in stored} == {data.name}
    assert data.stat().st_size == max(offset + length for _, offset, length in stored)
    assert data.stat().st_size < 1.05 * sum(length for _, _, length in stored) + 64 * 1024
    assert path.stat().st_size < data.stat().st_size / 20


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_external_data_beside_the_model_with_either_exporter(tmp_path, exporter):
    # The dynamo exporter writes its own data file (kept, only the proto is saved again); the TorchScript-based one
    # writes the weights inline under 2 GB (saved again with them outside).
    extractor = fxfeat.compile(torchvision.models.resnet18().eval(), out_indices=(1, 3), input_size=(3, 64, 64))
    path = tmp_path / "out" / "resnet.onnx"
    path.parent.mkdir()
    report = export.to_onnx(extractor, path, exporter=exporter, external_data=True)
    assert report.exporter == exporter and len(report.checks) == 3
    _assert_one_data_file(path, report)
    x = torch.randn(3, 3, 80, 96)
    for a, b in zip(_onnx_outputs(path, x), _eager(extractor, x)):
        _assert_close(a, b)
    # The two files travel together: moved elsewhere, the model still finds its weights (a relative location).
    moved = tmp_path / "moved"
    moved.mkdir()
    for file in list(path.parent.iterdir()):
        file.rename(moved / file.name)
    for a, b in zip(_onnx_outputs(moved / path.name, x), _eager(extractor, x)):
        _assert_close(a, b)
    # feature_info is read without the weights; without its data file the model does not load.
    (moved / f"{path.name}.data").unlink()
    assert export.read_onnx_feature_info(moved / path.name).get_dicts() == extractor.feature_info.get_dicts()
    with pytest.raises(Exception, match=r"resnet\.onnx\.data"):
        _onnx_outputs(moved / path.name, x)


def test_onnx_external_data_by_size_and_the_stale_data_file(tmp_path, monkeypatch):
    from fxfeat.export import onnx_model

    extractor = fxfeat.compile(torchvision.models.resnet18().eval(), out_indices=(1,), input_size=(3, 64, 64))
    path, data = tmp_path / "model.onnx", tmp_path / "model.onnx.data"
    monkeypatch.setattr(onnx_model, "SINGLE_FILE_LIMIT", 64 * 1024)  # resnet18's layer1 as if it were over 2 GiB
    report = export.to_onnx(extractor, path, dynamic=False)  # external_data=None: decided by size
    _assert_one_data_file(path, report)
    size = data.stat().st_size
    report = export.to_onnx(extractor, path, dynamic=False, external_data=True)  # again: replaced, not appended
    assert data.stat().st_size == size and report.checks[0].max_abs_error < 1e-4
    with pytest.raises(fxfeat.ExportError, match=r"over protobuf's 2 GiB limit[\s\S]*Hint: .*model\.onnx\.data"):
        export.to_onnx(extractor, path, dynamic=False, external_data=False)  # refused before exporting
    assert data.stat().st_size == size  # and the earlier export is left whole
    monkeypatch.undo()
    report = export.to_onnx(extractor, path, dynamic=False)  # under the limit: one file, the old data file gone
    assert report.data_path is None and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert not _external_locations(path)
    x = torch.randn(2, 3, 64, 64)
    for a, b in zip(_onnx_outputs(path, x), _eager(extractor, x)):
        _assert_close(a, b)
    with pytest.raises(fxfeat.InvalidRequestError, match="external_data"):
        export.to_onnx(extractor, path, external_data="yes")


def test_onnx_one_file_per_weight_becomes_one_data_file(tmp_path):
    # The TorchScript-based exporter writes a model over 2 GB with one file per weight, named after it, beside
    # the model; finish() gathers them in one data file and leaves none of them.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from fxfeat.export.onnx_model import finish

    weights = [numpy_helper.from_array(np.full((64, 64), value, dtype=np.float32), name)
               for value, name in [(1.0, "w1"), (2.0, "w2")]]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["out"])],
        "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64])], initializer=weights)
    exported, checked = tmp_path / "exported" / "m.onnx", tmp_path / "checked" / "m.onnx"
    exported.parent.mkdir()
    checked.parent.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(exported),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["m.onnx", "w1", "w2"]
    data = finish(exported, checked, ["features"], {"fxfeat.exporter": "torchscript"}, None)
    assert data is None and sorted(p.name for p in checked.parent.iterdir()) == ["m.onnx"]  # 32 KB: one file
    outside = checked.with_name("n.onnx")
    assert finish(exported, outside, ["features"], {}, True) == outside.with_name("n.onnx.data")
    assert {location for location, _, _ in _external_locations(outside)} == {"n.onnx.data"}
    session = onnxruntime.InferenceSession(str(outside), providers=["CPUExecutionProvider"])
    (out,) = session.run(["features"], {"image": np.ones((1, 64), dtype=np.float32)})
    assert out.tolist() == [[64 * 64 * 2.0] * 64]


class _GiantTower(nn.Module):
    """A convolutional tower of 2.2 GB (two 1x1 convolutions of 16600 channels, 1.1 GB each: real towers spread
    their weights over many tensors, and ONNX Runtime's optimiser refuses a single weight over 2 GiB), cheap to run
    at 16 x 16 and quick to fill (seeded uniform, no init)."""

    def __init__(self, width: int = 16600):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 4, stride=4)
        self.middle, self.last = (self._huge(width, seed, stride) for seed, stride in ((1, 2), (2, 1)))

    @staticmethod
    def _huge(width: int, seed: int, stride: int) -> nn.Conv2d:
        conv = nn.Conv2d(width, width, 1, stride=stride, device="meta").to_empty(device="cpu")
        with torch.no_grad():
            conv.weight.uniform_(-(width ** -0.5), width ** -0.5, generator=torch.Generator().manual_seed(seed))
            conv.bias.zero_()
        return conv

    def forward(self, x):
        return self.last(self.middle(self.stem(x).relu()).relu()).relu()


# Under the zoo marker: a 2.2 GB model takes about 1 min per exporter on 2 CPU cores (the TorchScript-based one
# writes one file per weight, gathered again) and 9 GB of memory (ONNX Runtime's session alone 5.4 GB).
@pytest.mark.zoo
def test_onnx_model_over_2_gib_exports_with_either_exporter(tmp_path):
    extractor = fxfeat.compile(_GiantTower().eval(), input_size=(3, 16, 16))
    assert sum(p.numel() * 4 for p in extractor.parameters()) > 2**31
    x = torch.randn(2, 3, 16, 16)
    for exporter in ("dynamo", "torchscript"):
        directory = tmp_path / exporter
        directory.mkdir()
        report = export.to_onnx(extractor, directory / "tower.onnx", dynamic=False, exporter=exporter)
        _assert_one_data_file(directory / "tower.onnx", report)
        assert (directory / "tower.onnx.data").stat().st_size > 2**31 and report.exporter == exporter
        assert report.checks[0].max_abs_error < 1e-4
        for a, b in zip(_onnx_outputs(directory / "tower.onnx", x), _eager(extractor, x)):
            _assert_close(a, b)
        assert export.read_onnx_feature_info(directory / "tower.onnx").channels() == [16600, 16600]
    with pytest.raises(fxfeat.ExportError, match=r"2\.06 GiB, over protobuf's 2 GiB limit"):
        export.to_onnx(extractor, tmp_path / "single.onnx", dynamic=False, external_data=False)
