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
