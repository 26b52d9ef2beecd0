"""``fxfeat.plot`` and ``inspect --plot``: the numbers drawn, read back from the SVG's text, are those of
``feature_info`` (and of ``fxfeat.inspect``'s report) on a CNN, a ViT, an HRNet and a Swin, at their probe size
and at another; the feature-map panels have the levels' shapes; the user's model is left as it was; errors say what
to do. Random weights, small models."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torchvision
from PIL import Image

import fxfeat
from fxfeat.cli import main
from fxfeat.drawing.maps import principal_rgb
from fxfeat.drawing.summary import spatial_size

# HRNet declares modules its graph lacks; fxfeat places them by reduction and says so
pytestmark = pytest.mark.filterwarnings("ignore::fxfeat.FxFeatWarning")

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "vit24": lambda: timm.create_model("vit_tiny_patch16_224", depth=24, dynamic_img_size=True),
    "hrnet": lambda: timm.create_model("hrnet_w18_small"),
    "swin": lambda: timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1)),
}
# (model, compile arguments): each at its probe size, two at another size, one with out_indices and output_stride,
# one with levels named by the user
CASES = [
    ("resnet18", {}),
    ("resnet18", {"input_size": (3, 160, 192), "out_indices": (2, 3, 4), "output_stride": 16}),
    ("resnet18", {"levels": ["layer1.0", "layer3", "layer4.1.conv1"]}),
    ("vit24", {}),
    ("vit24", {"input_size": (3, 160, 160), "out_indices": (5, 11, 17, 23)}),
    ("hrnet", {}),
    ("swin", {}),
]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: make().eval() for name, make in MODELS.items()}


def _svg_texts(path) -> dict[str, list[str]]:
    """The lines of text of each group with an id (a text artist's gid) in an SVG matplotlib wrote."""
    root = ElementTree.parse(path).getroot()
    found = {}
    for group in root.iter("{http://www.w3.org/2000/svg}g"):
        lines = [element.text for element in group.iter("{http://www.w3.org/2000/svg}text") if element.text]
        if lines and group.get("id"):
            found[group.get("id")] = lines
    return found


def _read_level(title: list[str], details: list[str]) -> dict:
    """A level's box as drawn: index, module, node, reduction, H x W, channels, parameters (or None)."""
    text = "\n".join(details)
    size = re.search(r"^(\d+)×(\d+)$", text, re.M)
    params = re.search(r"^([\d.]+)([Mk]?) params$", text, re.M)
    return {
        "index": int(title[0].lstrip("#")),
        "module": title[1],
        "node": re.search(r"^node (\S+)$", text, re.M).group(1),
        "reduction": int(re.search(r"^reduction (\d+)$", text, re.M).group(1)),
        "size": (int(size.group(1)), int(size.group(2))) if size else None,
        "channels": int(re.search(r"^(\d+) ch$", text, re.M).group(1)),
        "params": float(params.group(1)) * {"M": 1e6, "k": 1e3, "": 1}[params.group(2)] if params else None,
    }


@pytest.mark.parametrize(("name", "arguments"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_the_numbers_drawn_are_feature_info_and_the_report(models, name, arguments, tmp_path):
    model = models[name]
    path = tmp_path / "levels.svg"
    fxfeat.plot(model, path, **arguments)
    texts = _svg_texts(path)
    info = fxfeat.compile(model, **arguments).feature_info
    report = fxfeat.inspect(model, **{key: value for key, value in arguments.items() if key != "output_stride"})
    drawn = {level["index"]: level for level in (
        _read_level(texts[f"level-{i}-title"], texts[f"level-{i}-details"])
        for i in range(len(info)) if f"level-{i}-title" in texts)}
    assert sorted(drawn) == sorted(info.out_indices)
    for index in info.out_indices:
        entry = info[index]
        assert drawn[index] | {"params": None} == {
            "index": index, "module": entry["module"], "node": entry["node"], "reduction": entry["reduction"],
            "size": spatial_size(entry["shape"], entry["fmt"]), "channels": entry["num_chs"], "params": None}
        kept = report.levels[index].parameters   # drawn as 11.18M, 683.1k or 512
        assert abs(drawn[index]["params"] - kept) <= (5000 if kept >= 1e6 else 50 if kept >= 1000 else 0)
    # the levels not returned are rolled up: each in exactly one grey box, counted there
    rolled = {gid: lines for gid, lines in texts.items() if gid.startswith("rolled-") and gid.endswith("-title")}
    covered = []
    for lines in rolled.values():
        first, _, last = lines[0].lstrip("#").partition("–")
        covered.extend(range(int(first), int(last or first) + 1))
        if last:
            assert lines[1] == f"×{int(last) - int(first) + 1}"
    assert sorted(covered) == [i for i in range(len(info)) if i not in info.out_indices]
    title = " ".join(texts["title"])
    assert f"out_indices={info.out_indices}" in title
    assert ("output_stride=16" in title) == ("output_stride" in arguments)
    assert ("chosen by the user" in title) == ("levels" in arguments)
    assert texts["input-details"] == ["×".join(map(str, arguments.get("input_size", report.input_size)))]


def test_a_24_block_vit_is_rolled_up_to_the_levels_it_returns(models, tmp_path):
    fxfeat.plot(models["vit24"], tmp_path / "vit.svg")
    texts = _svg_texts(tmp_path / "vit.svg")
    assert texts["rolled-0-title"] == ["#0–20", "×21"]
    assert [gid for gid in texts if gid.startswith("level-") and gid.endswith("-title")] == [
        "level-21-title", "level-22-title", "level-23-title"]


def test_the_head_is_drawn_from_the_head_features_feature_info(models, tmp_path):
    model = models["resnet18"]
    fxfeat.plot(model, tmp_path / "head.svg")
    texts = _svg_texts(tmp_path / "head.svg")
    info = fxfeat.compile(model, levels=["unpooled", "pooled", "embedding"]).feature_info
    unpooled, pooled, embedding = info.get_dicts()
    assert texts["head-unpooled-details"] == [f"node {unpooled['node']}", "reduction 32",
                                              "×".join(map(str, unpooled["shape"][1:])), f"{unpooled['num_chs']} ch"]
    assert texts["head-pooled-details"] == [f"node {pooled['node']}", f"{pooled['shape'][0]} features"]
    assert texts["head-embedding-details"] == [f"node {embedding['node']}", f"{embedding['shape'][0]} features"]
    report = fxfeat.inspect(model)
    assert texts["head-pool"] == ["global pool", report.head.global_pool]
    assert texts["head-linear"] == ["linear", *report.head.final.linear]


def test_an_extractor_is_drawn_from_its_feature_info(models, tmp_path):
    extractor = fxfeat.compile(models["swin"], out_indices=(1, 3))
    fxfeat.plot(extractor, tmp_path / "extractor.svg")
    texts = _svg_texts(tmp_path / "extractor.svg")
    for index in (1, 3):
        entry = extractor.feature_info[index]
        drawn = _read_level(texts[f"level-{index}-title"], texts[f"level-{index}-details"])
        assert (drawn["module"], drawn["reduction"], drawn["size"], drawn["channels"], drawn["params"]) == (
            entry["module"], entry["reduction"], spatial_size(entry["shape"], entry["fmt"]), entry["num_chs"], None)
    assert "pass the model" in " ".join(texts["title"])
    with pytest.raises(fxfeat.InvalidRequestError, match="pass the model instead"):
        fxfeat.plot(extractor, out_indices=(2, 3))


def _panel_shapes(figure) -> list[tuple[int, ...]]:
    return [axes.images[0].get_array().shape for axes in figure.subfigs[1].axes]


@pytest.mark.parametrize("name", ["resnet18", "vit24", "hrnet", "swin"])
def test_the_feature_map_panels_have_the_levels_shapes(models, name):
    model = models[name]
    image = torch.randint(0, 256, (3, 240, 320), dtype=torch.uint8)
    figure = fxfeat.plot(model, image=image)
    info = fxfeat.compile(model).feature_info
    height, width = fxfeat.inspect(model).input_size[1:]
    expected = [(height, width, 3)] + [(*spatial_size(shape, fmt), 3)
                                       for shape, fmt in zip(info.get("shape"), info.get("fmt"))]
    assert _panel_shapes(figure) == expected
    assert all(0 <= axes.images[0].get_array().min() and axes.images[0].get_array().max() <= 1
               for axes in figure.subfigs[1].axes)


def test_token_levels_returned_natively_are_drawn_as_their_grids(models, tmp_path):
    extractor = fxfeat.compile(models["vit24"], output_fmt="native")
    assert extractor.feature_info.get("fmt") == ["NLC"] * 3
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)).save(
        tmp_path / "image.png")
    figure = fxfeat.plot(extractor, image=tmp_path / "image.png")
    assert _panel_shapes(figure) == [(224, 224, 3)] + [(14, 14, 3)] * 3
    assert "a plain resize to 224×224 with ImageNet normalisation" in figure.subfigs[1]._suptitle.get_text()


def test_the_users_model_is_left_as_it_was(models):
    model = models["resnet18"]
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    strides = [(module.stride, module.dilation) for module in model.modules() if isinstance(module, torch.nn.Conv2d)]
    fonttype = matplotlib.rcParams["svg.fonttype"]
    fxfeat.plot(model, image=Image.new("RGB", (64, 48), (200, 30, 30)), output_stride=8)
    assert all(module.training for module in model.modules())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert [(module.stride, module.dilation) for module in model.modules()
            if isinstance(module, torch.nn.Conv2d)] == strides   # output_stride=8 rewrote copies
    assert matplotlib.rcParams["svg.fonttype"] == fonttype
    model.eval()


def test_principal_components_of_a_map():
    pattern = torch.arange(12.0).reshape(3, 4)
    rank_one = torch.stack([2 * pattern, -pattern, 0.5 * pattern])
    rgb = principal_rgb(rank_one)
    assert np.allclose(rgb[..., 0], (pattern / 11).numpy()) and np.all(rgb[..., 1:] == 0)
    rgb = principal_rgb(torch.randn(32, 5, 6))
    assert rgb.shape == (5, 6, 3) and np.allclose(rgb.reshape(-1, 3).min(0), 0) and np.allclose(
        rgb.reshape(-1, 3).max(0), 1)


def test_errors_say_what_to_do(models, tmp_path, monkeypatch):
    model = models["resnet18"]
    with pytest.raises(fxfeat.InvalidRequestError, match=r"SVG or PNG.*\nHint: name the file \.svg"):
        fxfeat.plot(model, tmp_path / "levels.jpg")
    with pytest.raises(fxfeat.InvalidRequestError, match=r"does not exist.*\nHint: give the path of an image"):
        fxfeat.plot(model, image=tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(fxfeat.InvalidRequestError, match="not an image PIL can read"):
        fxfeat.plot(model, image=tmp_path / "text.png")
    with pytest.raises(fxfeat.InvalidRequestError, match="Hint"):
        fxfeat.plot(model, image=torch.zeros(2, 3, 8, 8))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(fxfeat.MissingDependencyError, match=r"pip install 'fxfeat\[plot\]'"):
        fxfeat.plot(model)


def test_importing_fxfeat_does_not_import_matplotlib():
    code = "import sys, fxfeat; print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_inspect_plot_writes_the_picture(tmp_path, capsys):
    main(["inspect", "torchvision:resnet18", "--plot", str(tmp_path / "levels.svg"), "--out-indices", "3,4"])
    assert "ResNet: 5 levels" in capsys.readouterr().out
    texts = _svg_texts(tmp_path / "levels.svg")
    assert texts["level-4-title"] == ["#4", "layer4"] and "level-2-title" not in texts
    Image.new("RGB", (80, 60), (10, 120, 240)).save(tmp_path / "image.jpg")
    main(["inspect", "torchvision:resnet18", "--plot", str(tmp_path / "maps.png"), "--image",
          str(tmp_path / "image.jpg")])
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for arguments in (["--plot", str(tmp_path / "maps.png"), "--image", str(tmp_path / "missing.jpg")],
                      ["--image", str(tmp_path / "image.jpg")], ["--plot", str(tmp_path / "levels.pdf")]):
        with pytest.raises(SystemExit) as exit_code:
            main(["inspect", "torchvision:resnet18", *arguments])
        assert exit_code.value.code == 2 and "Hint:" in capsys.readouterr().err
