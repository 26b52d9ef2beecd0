"""The model catalog (fxfeat/zoo/, docs/catalog.md): its entries are what ``fxfeat.compile`` returns today, it names
every model of the installed libraries, its filters narrow, the command line prints it, bad queries raise errors
with a hint, a model of another library version is compiled on demand, and ``import fxfeat`` does not read it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fxfeat
from fxfeat.cli import main
from fxfeat.models import build_model
from fxfeat.zoo import query
from fxfeat.zoo.entry import HEAD_KEYS, catalog_entry

SHIPPED, _ = query._shipped()
SAME_VERSIONS = all(SHIPPED["versions"][lib] == query.installed_versions()[lib] for lib in query.LIBRARIES)
needs_same_versions = pytest.mark.skipif(not SAME_VERSIONS, reason="the catalog is of other library versions")


def _sample(count: int, seed: int = 0) -> list[dict]:
    """A seeded random sample of small compiled models, timm's and torchvision's."""
    small = [e for e in SHIPPED["entries"] if not e["error"] and e["params"] < 4_000_000]
    torchvision = [e for e in small if e["library"] == "torchvision"]
    timm = [e for e in small if e["library"] == "timm"]
    rng = random.Random(seed)
    return rng.sample(timm, min(count - 1, len(timm))) + rng.sample(torchvision, min(1, len(torchvision)))


@needs_same_versions
@pytest.mark.parametrize("entry", _sample(4), ids=lambda entry: f"{entry['library']}:{entry['name']}")
def test_entries_equal_compile_now(entry):
    """Compiled now on the CPU with real weights, the model has the catalog's levels, parameters and head shapes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(f"{entry['library']}:{entry['name']}")
        info = fxfeat.compile(model).feature_info
        returned = [info.get_dicts()[index] for index in info.out_indices]
        assert entry["levels"] == [dict(module=level["module"], reduction=level["reduction"],
                                        channels=level["num_chs"]) for level in returned]
        assert entry["params"] == sum(p.numel() for p in model.parameters())
        for key in HEAD_KEYS:
            if entry[key] is None:
                with pytest.raises(fxfeat.HeadNotFoundError):
                    fxfeat.compile(model, mode=key)
            else:
                head = fxfeat.compile(model, mode=key).eval()
                with torch.no_grad():
                    output = head(torch.randn(1, *entry["input_size"]))
                assert list(output.shape[1:]) == entry[key], key


@needs_same_versions
def test_a_model_the_meta_device_fails_is_compiled_on_the_cpu():
    """The smallest model the build had to compile on the CPU gets the same entry again, with the reason."""
    fallbacks = [e for e in SHIPPED["entries"] if e["device"] == "cpu" and not e["error"]]
    assert fallbacks and all(e["meta_error"] for e in fallbacks)
    shipped = min(fallbacks, key=lambda e: e["params"])
    entry = catalog_entry(shipped["library"], shipped["name"])
    assert {**entry, "seconds": None} == {**shipped, "seconds": None, "exports": None}


@needs_same_versions
def test_the_catalog_names_every_model_of_both_libraries():
    import timm
    import torchvision

    names = {(e["library"], e["name"]) for e in fxfeat.catalog()}
    expected = {("timm", name) for name in timm.list_models()}
    expected |= {("torchvision", name) for name in torchvision.models.list_models(module=torchvision.models)}
    assert names == expected
    assert all(e["levels"] or e["error"] for e in fxfeat.catalog())


def test_filters_narrow():
    everything = fxfeat.catalog()
    torchvision = fxfeat.catalog(library="torchvision")
    assert 0 < len(torchvision) < len(everything) and {e["library"] for e in torchvision} == {"torchvision"}
    eight = fxfeat.catalog(reduction=8, min_levels=4)
    assert eight and all(8 in [lv["reduction"] for lv in e["levels"]] and len(e["levels"]) >= 4 for e in eight)
    small = fxfeat.catalog(max_params="10M")
    assert small == fxfeat.catalog(max_params=10_000_000) and all(e["params"] <= 10_000_000 for e in small)
    assert 0 < len(small) < len(everything)
    onnx = fxfeat.catalog(exports="onnx")
    assert onnx and all("onnx" in e["exports"] for e in onnx)
    assert all(any(f.startswith("torchscript") for f in e["exports"]) for e in fxfeat.catalog(exports="torchscript"))
    tokens, maps = fxfeat.catalog(token=True), fxfeat.catalog(token=False)
    assert tokens and maps and {e["name"] for e in tokens}.isdisjoint(e["name"] for e in maps)


def test_entries_are_copies():
    first = fxfeat.catalog("torchvision:resnet18")[0]
    first["levels"][0]["channels"] = -1
    first["pooled"].append(-1)
    again = fxfeat.catalog("torchvision:resnet18")[0]
    assert again["levels"][0]["channels"] == 64 and again["pooled"] == [512]


def test_a_query_answers_fast():
    """Under 100 ms measured on a quiet machine (docs/catalog.md); here a loose bound that load cannot break."""
    fxfeat.catalog()  # the first query reads the data file
    start = time.perf_counter()
    fxfeat.catalog(library="timm", reduction=8, min_levels=4, max_params="10M")
    assert time.perf_counter() - start < 1.0


def test_import_fxfeat_does_not_read_the_catalog():
    code = ("import fxfeat, fxfeat.zoo.query as q; assert q._shipped.cache_info().currsize == 0; "
            "fxfeat.catalog(library='torchvision'); assert q._shipped.cache_info().currsize == 1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("arguments, error, hint", [
    (dict(library="keras"), fxfeat.InvalidRequestError, "timm, torchvision"),
    (dict(max_params="ten million"), fxfeat.InvalidRequestError, "10M"),
    (dict(max_params=-3), fxfeat.InvalidRequestError, "10M"),
    (dict(exports="tflite"), fxfeat.InvalidRequestError, "onnx"),
    (dict(reduction="8"), fxfeat.InvalidRequestError, "reduction=8"),
    (dict(name="torchvision:resnet19"), fxfeat.InvalidModelError, "resnet18"),
    (dict(name="keras:resnet50"), fxfeat.InvalidRequestError, "timm:NAME"),
])
def test_bad_queries_raise_with_a_hint(arguments, error, hint):
    with pytest.raises(error) as raised:
        fxfeat.catalog(**arguments)
    assert isinstance(raised.value, fxfeat.FxFeatError) and hint in raised.value.hint


def test_another_library_version_compiles_on_demand(monkeypatch):
    """A model named by the query is compiled for the installed version; a filter query says the catalog is of
    another version."""
    monkeypatch.setattr(query, "installed_versions", lambda: dict(timm="0.0.1", torchvision="0.0.1"))
    monkeypatch.setattr(query, "_compiled_here", {})
    entry = fxfeat.catalog("torchvision:resnet18")[0]
    assert query._compiled_here and entry["levels"][-1] == dict(module="layer4", reduction=32, channels=512)
    assert entry["params"] == 11_689_512 and entry["pooled"] == [512] and entry["error"] is None
    with pytest.warns(fxfeat.FxFeatWarning, match="built with torchvision"):
        fxfeat.catalog(library="torchvision")


def test_cli_prints_the_catalog_as_json_and_filters_narrow(capsys):
    main(["models", "--library", "torchvision", "--json"])
    every = json.loads(capsys.readouterr().out)
    main(["models", "--library", "torchvision", "--max-params", "5M", "--reduction", "8", "--json"])
    small = json.loads(capsys.readouterr().out)
    assert 0 < len(small) < len(every) and all(e["params"] <= 5_000_000 for e in small)
    main(["models", "torchvision:resnet18"])
    table = capsys.readouterr().out
    assert "torchvision:resnet18" in table and "32:512" in table and table.endswith("1 model\n")


def test_cli_bad_max_params_exits_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["models", "--max-params", "lots"])
    assert exited.value.code == 2 and "Hint:" in capsys.readouterr().err
