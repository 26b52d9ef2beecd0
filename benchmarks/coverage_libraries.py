"""``make coverage``'s section for models of other libraries, each against what its own library says its features
are:

- ``efficientnet_pytorch`` (its one family, the smallest model): the maps of ``extract_endpoints`` up to the last
  block (``reduction_6`` is the head convolution, which fxfeat's convention leaves out);
- ``pretrainedmodels``: the smallest model of each family (its module), random weights, at the size it declares:
  ``model.features(x)``, the map the library's ``logits`` pools, against fxfeat's levels (*identical* here: it is
  the deepest) and its ``mode="unpooled"``;
- Hugging Face ``transformers``: every model class with a ``*Backbone`` counterpart, default configuration, random
  weights shared with the backbone: the backbone's feature maps for every stage, its extra norms removed
  (``hidden_states_norms``, ``apply_layernorm``);
- ``segmentation_models_pytorch``: the smallest encoder of each encoder class: the pyramid it returns.

A reference counts as *contained* when each of its maps equals (``torch.equal``, in fxfeat's layout) one of fxfeat's
levels, *identical* when they are the same list. Outputs are also checked against the eager model
(:func:`benchmarks.references.eager_references`).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import fxfeat
from benchmarks.coverage_check import compare_feature, describe_error, head_features, head_miss
from benchmarks.references import as_list, eager_references, equal_maps, with_identity

__all__ = ["check_heads", "check_library_model", "head_totals", "hugging_face_backbone_maps", "library_cases",
           "summarise_libraries", "markdown_section"]

LIBRARIES = ("efficientnet_pytorch", "pretrainedmodels", "transformers", "smp")
# Hugging Face backbones without a model class of the same name, or that need a package fxfeat's tests do not
# install: not measured (the reason is reported).
_HF_SKIPPED = {"DinatBackbone": "needs natten", "TimmBackbone": "timm's own models: the timm section",
               "AutoBackbone": "a factory, not a model"}


def library_cases() -> list[dict[str, str]]:
    """The section's models: ``{"library", "name", "family"}`` each (libraries that are not installed left
    out)."""
    cases = []
    try:
        import efficientnet_pytorch  # noqa: F401

        cases.append(dict(library="efficientnet_pytorch", name="efficientnet-b0", family="EfficientNet"))
    except ImportError:
        pass
    try:
        import pretrainedmodels

        smallest: dict[str, tuple[int, str]] = {}
        for name in pretrainedmodels.model_names:
            family = pretrainedmodels.__dict__[name].__module__.rsplit(".", 1)[-1]
            size = _parameters(lambda name=name: _pretrainedmodels(name))
            if family not in smallest or size < smallest[family][0]:
                smallest[family] = (size, name)
        cases += [dict(library="pretrainedmodels", name=name, family=family)
                  for family, (_, name) in sorted(smallest.items())]
    except ImportError:
        pass
    try:
        import transformers

        cases += [dict(library="transformers", name=name, family=name.removesuffix("Backbone"))
                  for name in sorted(dir(transformers)) if name.endswith("Backbone")]
    except ImportError:
        pass
    try:
        import segmentation_models_pytorch as smp

        smallest = {}
        for name, entry in smp.encoders.encoders.items():
            family = entry["encoder"].__name__
            size = _parameters(lambda name=name: smp.encoders.get_encoder(name, weights=None))
            if family not in smallest or size < smallest[family][0]:
                smallest[family] = (size, name)
        cases += [dict(library="smp", name=name, family=family) for family, (_, name) in sorted(smallest.items())]
    except ImportError:
        pass
    return cases


def _parameters(build) -> int:
    """Parameter count of the module ``build()`` makes: on the ``meta`` device where its constructor allows it
    (no memory, no time), else for real."""
    try:
        with torch.device("meta"):
            module = build()
    except Exception:  # a constructor reading a value (``x.item()``) cannot run on meta tensors
        module = build()
    return sum(parameter.numel() for parameter in module.parameters())


def _pretrainedmodels(name: str) -> nn.Module:
    import pretrainedmodels

    return pretrainedmodels.__dict__[name](num_classes=1000, pretrained=None)


def hugging_face_backbone_maps(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps of the ``*Backbone`` counterpart of a Hugging Face model, carrying its weights, every
    stage out, the backbone's extra norms removed (``hidden_states_norms`` as identities, ``apply_layernorm``
    off)."""
    import transformers

    config = copy.deepcopy(model.config)
    config.out_features = list(config.stage_names[1:])
    if hasattr(config, "apply_layernorm"):
        config.apply_layernorm = False
    if isinstance(getattr(config, "hidden_sizes", None), tuple):
        config.hidden_sizes = list(config.hidden_sizes)
    backbone = getattr(transformers, type(model).__name__.replace("Model", "Backbone"))(config).eval()
    inner = next((child for child in backbone.children() if isinstance(child, type(model))), backbone)
    missing = inner.load_state_dict(model.state_dict(), strict=False).missing_keys
    unloaded = [key for key in missing if not key.startswith("hidden_states_norms")]
    if unloaded:
        raise ValueError(f"the backbone has weights the model does not: {unloaded[:3]}")
    for stage in list(getattr(backbone, "hidden_states_norms", {}) or {}):
        backbone.hidden_states_norms[stage] = nn.Identity()
    with torch.no_grad():
        return list(backbone(x).feature_maps)


def _build(library: str, name: str) -> tuple[nn.Module, Any]:
    """The model and a function of ``x`` returning its library's reference maps."""
    torch.manual_seed(0)
    if library == "efficientnet_pytorch":
        from efficientnet_pytorch import EfficientNet

        model = EfficientNet.from_name(name).eval()
        return model, lambda x: list(model.extract_endpoints(x).values())[:5]
    if library == "pretrainedmodels":
        model = _pretrainedmodels(name).eval()
        return model, lambda x: [model.features(x)]
    if library == "transformers":
        import transformers

        if name in _HF_SKIPPED:
            raise LookupError(_HF_SKIPPED[name])
        base = name.replace("Backbone", "Model")
        config_class = getattr(transformers, name.replace("Backbone", "Config"), None)
        if not hasattr(transformers, base) or config_class is None:
            raise LookupError(f"no {base} beside {name}")
        model = getattr(transformers, base)(config_class()).eval()
        return model, lambda x: hugging_face_backbone_maps(model, x)
    import segmentation_models_pytorch as smp

    model = smp.encoders.get_encoder(name, weights=None).eval()
    return model, lambda x: [feature for feature in model(x) if feature.shape[1] > 0][1:]  # not the input


def check_library_model(library: str, name: str, *, heads: bool = True,
                        on_levels_checked: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """fxfeat's automatic levels of one model against its library's maps, and with ``heads`` its head features
    against the library's outputs (:func:`check_heads`). Failures are recorded, not raised. ``on_levels_checked``
    as for :func:`benchmarks.coverage_check.check_model`."""
    result: dict[str, Any] = dict(library=library, name=name)
    try:
        model, reference = _build(library, name)
    except LookupError as skipped:
        return dict(result, skipped=str(skipped))
    size = _declared_size(library, name)
    torch.manual_seed(1)
    x = torch.randn(1, *size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result.update(_check_levels(library, model, reference, x, size))
    if heads:
        if on_levels_checked is not None:
            on_levels_checked(result)
        start = time.perf_counter()
        result["heads"] = check_heads(library, model, x, size)
        result["heads"]["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _check_levels(library: str, model: nn.Module, reference, x: torch.Tensor,
                  size: tuple[int, int, int]) -> dict[str, Any]:
    """The levels' part of :func:`check_library_model`: its result's fields."""
    result: dict[str, Any] = {}
    try:
        extractor = fxfeat.compile(model, levels="auto", input_size=size).eval()
        count = len(extractor.feature_info)
        if len(extractor.feature_info.out_indices) < count:  # an isotropic body: every block, not the last 3
            extractor = fxfeat.compile(model, levels="auto", input_size=size,
                                       out_indices=tuple(range(count))).eval()
    except Exception as error:
        return dict(result, error=f"compile: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    result["levels"] = [dict(module=e["module"], node=e["node"], reduction=e["reduction"], channels=e["num_chs"])
                        for e in extractor.feature_info.get_dicts()]
    with torch.no_grad():
        outputs = extractor(x)
        outputs = as_list(outputs)
        try:
            maps = reference(x)
        except Exception as error:
            return dict(result, error=f"reference: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    found = [next((i for i, output in enumerate(outputs) if equal_maps(map_, output)), None)
             for map_ in maps]
    result.update(references=[list(map_.shape[1:]) for map_ in maps], found=found,
                  contained=all(i is not None for i in found),
                  identical=found == list(range(len(outputs))) if library != "pretrainedmodels" else
                  found == [len(outputs) - 1])  # features() is one map: the deepest level
    references = eager_references(model, extractor.feature_info, x)
    result["eager_equal"] = all(equal_maps(r, o) for r, o in zip(references, outputs))
    if library == "pretrainedmodels":
        try:
            unpooled = fxfeat.compile(model, mode="unpooled", input_size=size).eval()
            with torch.no_grad():
                result["unpooled_equal"] = torch.equal(maps[0], unpooled(x))
        except fxfeat.FxFeatError as error:
            result["unpooled_equal"] = False
            result["unpooled_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return result


# The layer each library's own classifier is (its ``forward`` ends with it): the model with it made an identity
# computes the library's pooled vector (pretrainedmodels' ``logits`` reads ``last_linear``).
_FINAL_LINEAR = {"efficientnet_pytorch": "_fc", "pretrainedmodels": "last_linear"}
_NO_VECTOR = {"smp": "the encoder returns its pyramid of maps, no vector per image"}


def check_heads(library: str, model: nn.Module, x: torch.Tensor, size: tuple[int, int, int]) -> dict[str, Any]:
    """``pooled`` and ``embedding`` of one model against its library's outputs: ``embedding`` against the model's
    own vector (efficientnet_pytorch's and pretrainedmodels' ``model(x)``, a Hugging Face model's
    ``image_embeds``, else ``pooler_output``), ``pooled`` against the model with its classifier
    (``_FINAL_LINEAR``) made an identity, or Hugging Face's ``pooler_output``. A model returning no vector per
    image (segmentation_models_pytorch's encoders, a Hugging Face model without a pooler or whose pooler keeps a
    1x1 map) must raise ``HeadNotFoundError``: recorded as ``expected_error``. A feature without a reference
    records its shape only (``unchecked``)."""
    try:
        references, no_vector = _head_references(library, model, x)
    except Exception as error:  # the model's own forward failing: nothing to compare with
        return dict(error=f"reference: {describe_error(error)}")
    record: dict[str, Any] = {}
    outputs = head_features(model, x, ("pooled", "embedding"), input_size=size, together=no_vector is None)
    for feature, output in outputs.items():
        if no_vector is not None:
            record[feature] = _expect_no_vector(output, no_vector)
        elif feature in references:
            record[feature] = compare_feature(output, references[feature])
        elif isinstance(output, BaseException):
            record[feature] = dict(error=describe_error(output))
        else:
            record[feature] = dict(shape=list(output.shape), unchecked="no reference in the library")
    return record


def _expect_no_vector(output, reason: str) -> dict[str, Any]:
    """The record of a feature that a model returning no vector per image must not have."""
    if isinstance(output, fxfeat.HeadNotFoundError):
        return dict(expected_error=describe_error(output), expected=reason)
    if isinstance(output, BaseException):
        return dict(error=describe_error(output))
    return dict(shape=list(output.shape), unexpected=f"fxfeat returns a tensor, but {reason}")


def _head_references(library: str, model: nn.Module, x: torch.Tensor) -> tuple[dict[str, Any], str | None]:
    """Functions computing each head feature's reference, and why the model has none where it returns no vector
    per image."""
    if library in _NO_VECTOR:
        return {}, _NO_VECTOR[library]
    if library in _FINAL_LINEAR:
        references = dict(embedding=lambda: model(x))
        if hasattr(model, _FINAL_LINEAR[library]):
            references["pooled"] = lambda: with_identity(model, _FINAL_LINEAR[library])(x)
        return references, None
    with torch.no_grad():
        fields = model(x)
    vector = fields.get("image_embeds", fields.get("pooler_output"))
    if vector is None or vector.dim() != 2:
        returned = ", ".join(f"{key} {list(value.shape[1:])}" for key, value in fields.items()
                             if isinstance(value, torch.Tensor))
        return {}, f"the model returns no vector per image ({returned})"
    references = dict(embedding=lambda: vector)
    if fields.get("pooler_output") is not None:
        references["pooled"] = lambda: fields["pooler_output"]
    return references, None


def _declared_size(library: str, name: str) -> tuple[int, int, int]:
    """The input size a library declares for a model's weights (pretrainedmodels' and smp's
    ``pretrained_settings``: 299 for the Inception family, 331 for the large NASNets), else 3x224x224."""
    settings = {}
    if library == "pretrainedmodels":
        import pretrainedmodels

        settings = pretrainedmodels.pretrained_settings.get(name, {})
    elif library == "smp":
        import segmentation_models_pytorch as smp

        settings = smp.encoders.encoders[name].get("pretrained_settings") or {}
    for entry in settings.values():
        size = entry.get("input_size") if isinstance(entry, dict) else None
        if isinstance(size, (list, tuple)) and len(size) == 3:
            return tuple(size) if size[0] in (1, 3) else (size[2], size[0], size[1])
    return (3, 224, 224)


def summarise_libraries(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per library: measured models, compiled, references contained, identical, eager-equal."""
    summary: dict[str, Any] = {}
    by_library = defaultdict(list)
    for row in results:
        by_library[row["library"]].append(row)
    for library, rows in by_library.items():
        measured = [row for row in rows if "skipped" not in row]
        compiled = [row for row in measured if "levels" in row]
        summary[library] = dict(
            models=len(measured), skipped=len(rows) - len(measured), compiled=len(compiled),
            contained=sum(bool(row.get("contained")) for row in compiled),
            identical=sum(bool(row.get("identical")) for row in compiled),
            eager_equal=sum(bool(row.get("eager_equal")) for row in compiled),
            unpooled_equal=sum(bool(row.get("unpooled_equal")) for row in compiled) if library == "pretrainedmodels"
            else None,
            **({"heads": head_totals(measured)} if any("heads" in row for row in measured) else {}),
        )
    return summary


def _head_records(row: dict[str, Any], feature: str) -> dict[str, Any]:
    """One head feature's record of a row (``{"error": ...}`` where the row's head checks failed as a whole)."""
    heads = row.get("heads")
    if heads is None:
        return dict(error=row.get("error", "not checked"))
    return heads.get(feature, dict(error=heads.get("error", "not checked")))


def head_totals(results: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Over measured models (not skipped): ``embedding`` and ``pooled`` equal to their reference, out of the
    features with one (a failure to compile counts against, a feature without a reference does not count), and
    ``no_vector``: features that raise ``HeadNotFoundError`` as expected, out of those of models returning no
    vector per image."""
    totals = {key: dict(hits=0, total=0) for key in ("embedding", "pooled", "no_vector")}
    for row in results:
        if "skipped" in row:
            continue
        for feature in ("embedding", "pooled"):
            record = _head_records(row, feature)
            if "unchecked" in record:
                continue
            key = "no_vector" if "expected" in record or "unexpected" in record else feature
            totals[key]["total"] += 1
            totals[key]["hits"] += bool(record.get("equal") or "expected_error" in record)
    return totals


# Why fxfeat's levels and a library's reference differ, where analysed (rendered beside the miss).
EXPLANATIONS = {
    "SwinBackbone": "SwinBackbone runs its encoder with `always_partition=True`, so its last stage (shifted windows "
    "on a map the size of a window) computes another function than SwinModel's, whose last hidden state fxfeat's "
    "deepest level equals; the maps before the three mergings are equal",
    "FocalNetBackbone": "FocalNetBackbone returns each stage's map after its downsampling (its hidden states), "
    "unlike SwinBackbone; fxfeat's levels are the maps before the downsampling, as for Swin",
    "HieraBackbone": "Hiera unrolls its map into tokens that are not in raster order, so fxfeat takes none of its "
    "token maps as levels (docs/levels.md)",
}
_TITLES = {"efficientnet_pytorch": "efficientnet_pytorch (against `extract_endpoints` up to the last block)",
           "pretrainedmodels": "pretrainedmodels (against `features()`)",
           "transformers": "Hugging Face `*Backbone` counterparts (against the backbone's maps, extra norms removed)",
           "smp": "segmentation_models_pytorch encoders (against the pyramid they return)"}


def markdown_section(results: list[dict[str, Any]]) -> list[str]:
    """The report's lines for the section."""
    summary = summarise_libraries(results)
    heads = any("heads" in row for row in results)
    lines = ["## Other libraries", "",
             "Each model against what its own library gives as its features (see "
             "`benchmarks/coverage_libraries.py`): *contained*: each reference map equals one of fxfeat's automatic "
             "levels; *identical*: the same list.",
             "",
             "| library | measured | compile | contained | identical | bit-equal to eager | unpooled = features() |"
             + (" `embedding` equal | `pooled` equal | no vector: `HeadNotFoundError` |" if heads else ""),
             "|---|---|---|---|---|---|---|" + "---|" * (3 * heads)]
    for library, counts in summary.items():
        unpooled = "-" if counts["unpooled_equal"] is None else f"{counts['unpooled_equal']}/{counts['compiled']}"
        lines.append(f"| {library} | {counts['models']} (+{counts['skipped']} not measured) | "
                     f"{counts['compiled']}/{counts['models']} | {counts['contained']}/{counts['compiled']} | "
                     f"{counts['identical']}/{counts['compiled']} | {counts['eager_equal']}/{counts['compiled']} | "
                     f"{unpooled} |"
                     + "".join(f" {_count(counts.get('heads', {}).get(key))} |"
                               for key in (("embedding", "pooled", "no_vector") if heads else ())))
    for library in summary:
        lines += ["", f"### {_TITLES.get(library, library)}", "",
                  "| family | model | contained | identical | eager | "
                  + ("`embedding` | `pooled` | " if heads else "") + "fxfeat levels | note |",
                  "|---|---|---|---|---|---|---|" + "---|" * (2 * heads)]
        for row in (row for row in results if row["library"] == library):
            levels = " ".join(f"{level['module'] or level['node']}@{level['reduction']}"
                              for level in row.get("levels", []))
            note = row.get("skipped") or row.get("error") or ""
            if row.get("levels") and not row.get("contained"):
                missing = [shape for shape, i in zip(row.get("references", []), row.get("found", [])) if i is None]
                note = EXPLANATIONS.get(row["name"], f"reference maps not among the levels: {missing}")
            if row.get("unpooled_error"):
                note += f" unpooled: {row['unpooled_error']}"
            cells = [_head_cell(_head_records(row, feature)) for feature in (("embedding", "pooled") if heads else ())]
            lines.append(f"| {row.get('family', '')} | {row['name']} | {_mark(row.get('contained'))} | "
                         f"{_mark(row.get('identical'))} | {_mark(row.get('eager_equal'))} | "
                         + "".join(f"{cell} | " for cell in cells) + f"{levels} | {note} |")
    if heads:
        lines += ["", *_head_misses(results)]
    return lines


def _count(counts: dict[str, int] | None) -> str:
    return f"{counts['hits']}/{counts['total']}" if counts and counts["total"] else "-"


def _head_cell(record: dict[str, Any]) -> str:
    """A head feature's record in a table cell."""
    if "expected_error" in record:
        return "none (expected)"
    if "unchecked" in record:
        return f"{record['shape'][1:]} (no reference)"
    return _mark(record.get("equal", False))


def _head_misses(results: list[dict[str, Any]]) -> list[str]:
    """Every measured model's head feature that is neither equal to its reference nor absent as expected, and the
    features recorded without a reference."""
    lines = ["### Head features of other libraries: misses and unchecked", "",
             "`embedding` against the model's own vector (efficientnet_pytorch, pretrainedmodels: `model(x)`; Hugging "
             "Face: `image_embeds`, else `pooler_output`), `pooled` against the model with its classifier (`_fc`, "
             "`last_linear`) made an `nn.Identity`, or Hugging Face's `pooler_output`; models returning no vector per "
             "image (segmentation_models_pytorch encoders, Hugging Face models without a pooler or whose pooler keeps "
             "a 1x1 map) must raise `HeadNotFoundError`.", "",
             "| library | model | feature | what differs |", "|---|---|---|---|"]
    for row in results:
        if "skipped" in row:
            continue
        for feature in ("embedding", "pooled"):
            record = _head_records(row, feature)
            if record.get("equal") or "expected_error" in record:
                continue
            what = record.get("unexpected") or record.get("unchecked") or head_miss(record)
            if "unchecked" in record:
                what += f": compiles, shape {record['shape']}"
            lines.append(f"| {row['library']} | {row['name']} | `{feature}` | {what.replace('|', chr(92) + '|')} |")
    if lines[-1] == "|---|---|---|---|":
        lines.append("| none | | | |")
    return lines


def _mark(value) -> str:
    return "-" if value is None else ("yes" if value else "**no**")
