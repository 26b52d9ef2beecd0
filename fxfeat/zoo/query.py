"""``fxfeat.catalog(...)``: the models that fit a requirement, answered from the catalog shipped with the package
(``fxfeat/zoo/catalog.json.gz``, read once per process on the first query), or by compiling a model named by a
query where the installed library is of another version than the catalog's.

Example:
    >>> import fxfeat
    >>> small = fxfeat.catalog(library="torchvision", reduction=8, min_levels=5, max_params="3M")
    >>> [(entry["name"], [level["reduction"] for level in entry["levels"]]) for entry in small][:1]
    [('mnasnet0_5', [2, 4, 8, 16, 32])]
    >>> fxfeat.catalog("torchvision:resnet18")[0]["pooled"]
    [512]
"""

from __future__ import annotations

import difflib
import functools
import gzip
import importlib.metadata
import json
import re
import warnings
from pathlib import Path
from typing import Any

from fxfeat.errors import FxFeatWarning, InvalidModelError, InvalidRequestError

__all__ = ["CATALOG_FILE", "EXPORT_FORMATS", "FORMAT", "catalog", "installed_versions", "parse_params",
           "read_catalog", "write_catalog"]

CATALOG_FILE = Path(__file__).with_name("catalog.json.gz")
FORMAT = "fxfeat-catalog/1"
LIBRARIES = ("timm", "torchvision")
EXPORT_FORMATS = ("torchscript-script", "torchscript-trace", "onnx", "exported_program")
_EXPORT_NAMES = (*EXPORT_FORMATS, "torchscript")  # "torchscript": either of its two methods
_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}


@functools.lru_cache(maxsize=1)
def installed_versions() -> dict[str, str | None]:
    """The installed timm and torchvision versions (``None``: not installed), without importing them."""
    versions = {}
    for library in LIBRARIES:
        try:
            versions[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            versions[library] = None
    return versions


def write_catalog(catalog: dict[str, Any], path: Path) -> None:
    """Write ``catalog`` (``versions``, ``entries`` and the build's figures) as gzip-compressed JSON."""
    text = json.dumps(dict(catalog, format=FORMAT), separators=(",", ":"))
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as handle:  # mtime 0: the same file for the same data
        handle.write(text.encode())


def read_catalog(path: Path = CATALOG_FILE) -> dict[str, Any]:
    """The catalog written by :func:`write_catalog` (``benchmarks/catalog.py``)."""
    try:
        with gzip.open(path, "rt") as handle:
            catalog = json.load(handle)
    except FileNotFoundError:
        raise InvalidRequestError(f"No model catalog at {path}.",
                                  hint="build it with `make catalog` (python -m benchmarks.catalog).") from None
    if catalog.get("format") != FORMAT:
        raise InvalidRequestError(f"{path} is a catalog of format {catalog.get('format')!r}, not {FORMAT!r}.",
                                  hint="rebuild it with `make catalog`.")
    return catalog


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    catalog = read_catalog()
    return catalog, {(entry["library"], entry["name"]): entry for entry in catalog["entries"]}


_compiled_here: dict[tuple[str, str], dict[str, Any]] = {}  # entries compiled on demand in this process


def catalog(
    name: str | None = None,
    *,
    library: str | None = None,
    reduction: int | None = None,
    min_levels: int | None = None,
    max_params: int | str | None = None,
    exports: str | list[str] | None = None,
    token: bool | None = None,
) -> list[dict[str, Any]]:
    """Every timm and torchvision classification model that fits the filters, with its levels.

    Args:
        name: one model, ``timm:NAME`` or ``torchvision:NAME`` (a bare name is searched in both libraries).
            Where the installed library's version is not the catalog's, the model is compiled now (on the
            ``meta`` device: about a second) and its entry is this version's.
        library: ``"timm"`` or ``"torchvision"``.
        reduction: a level at this reduction (8: a map at 1/8 of the input's height and width).
        min_levels: at least this many levels, as ``fxfeat.compile(model)`` returns them by default.
        max_params: at most this many parameters: an int, or ``"10M"``, ``"500K"``, ``"1.5G"``.
        exports: a format (or a list of them, all required) the export zoo exported and checked the model to:
            ``"onnx"``, ``"torchscript"`` (either method), ``"torchscript-script"``, ``"torchscript-trace"``,
            ``"exported_program"``. Only the models the export zoo measured (docs/export-zoo.md) can match.
        token: ``True``: models whose levels include token sequences (ViT-style); ``False``: the others.

    Returns:
        A list of dicts (copies): ``name``, ``library``, ``params``, ``levels`` (each ``module``, ``reduction``,
        ``channels``: what ``fxfeat.compile(model)`` returns by default), ``source`` (``"declared"``: the
        model's own ``feature_info``; ``"discovered"``: fxfeat's level rule), ``token``, ``input_size`` (the
        probe size of the shapes), ``unpooled``, ``pooled``, ``embedding`` (the head features' shapes, ``None``
        where the model has none), ``exports`` (the formats that passed, ``None`` where not measured),
        ``error`` (why the model does not compile, else ``None``) and ``device`` (``"meta"``, or ``"cpu"``
        where the model does not build or run on the meta device: ``meta_error`` says why).

    Raises:
        InvalidRequestError: an unknown library or export format, a malformed ``max_params``.
        InvalidModelError: a ``name`` neither library has.

    Example:
        >>> import fxfeat
        >>> [entry["name"] for entry in fxfeat.catalog(library="torchvision", max_params="1.5M")]
        ['shufflenet_v2_x0_5', 'squeezenet1_0', 'squeezenet1_1']
    """
    checks = _filters(library, reduction, min_levels, max_params, exports, token)
    if name is not None:
        entries = _named(name, library)
    else:
        shipped, _ = _shipped()
        _warn_if_other_versions(shipped["versions"], library)
        entries = shipped["entries"]
    return [_copy(entry) for entry in entries if all(check(entry) for check in checks)]


def _filters(library, reduction, min_levels, max_params, exports, token) -> list:
    """The filters as predicates over entries, checked."""
    checks = []
    if library is not None:
        if library not in LIBRARIES:
            raise InvalidRequestError(f"The catalog has no library {library!r}.",
                                      hint=f"use one of {', '.join(LIBRARIES)}, or no library filter.")
        checks.append(lambda entry: entry["library"] == library)
    for value, what in ((reduction, "reduction"), (min_levels, "min_levels")):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidRequestError(f"{what} must be a positive int, not {value!r}.", hint=f"e.g. {what}=8.")
    if reduction is not None:
        checks.append(lambda entry: any(level["reduction"] == reduction for level in entry["levels"] or ()))
    if min_levels is not None:
        checks.append(lambda entry: len(entry["levels"] or ()) >= min_levels)
    if max_params is not None:
        limit = parse_params(max_params)
        checks.append(lambda entry: entry["params"] is not None and entry["params"] <= limit)
    for fmt in [exports] if isinstance(exports, str) else exports or ():
        if fmt not in _EXPORT_NAMES:
            raise InvalidRequestError(f"Unknown export format {fmt!r}.", hint=f"use one of {', '.join(_EXPORT_NAMES)}.")
        checks.append(lambda entry, fmt=fmt: any(passed.startswith(fmt) for passed in entry["exports"] or ()))
    if token is not None:
        checks.append(lambda entry: entry["levels"] is not None and entry["token"] == token)
    return checks


def parse_params(value: int | str) -> int:
    """A parameter count: an int, or a number with K, M or G (B) after it.

    Example:
        >>> parse_params("10M"), parse_params("1.5g"), parse_params(2500)
        (10000000, 1500000000, 2500)
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgb]?)\s*", value, re.IGNORECASE) if isinstance(value, str) else None
    if match is None:
        raise InvalidRequestError(f"{value!r} is not a parameter count.",
                                  hint="write a number with an optional K, M or G: 25000000, 500K, 10M, 1.5G.")
    return round(float(match[1]) * _SUFFIXES[match[2].upper()])


def _named(name: str, library: str | None) -> list[dict[str, Any]]:
    """The entry of one model: the catalog's, or compiled now where the installed library is of another version
    (or the catalog has no such model and the library does)."""
    wanted, _, bare = name.rpartition(":")
    libraries = [wanted] if wanted else [library] if library in LIBRARIES else list(LIBRARIES)
    if wanted and wanted not in LIBRARIES:
        raise InvalidRequestError(f"The catalog has no library {wanted!r} ({name!r}).",
                                  hint="name a model timm:NAME or torchvision:NAME.")
    shipped, by_name = _shipped()
    versions, found = installed_versions(), []
    for candidate in libraries:
        key = (candidate, bare)
        if versions[candidate] in (None, shipped["versions"][candidate]):  # not installed: the catalog answers
            found.append(by_name.get(key))
        else:
            found.append(_compiled_now(candidate, bare, wanted == candidate))
    found = [entry for entry in found if entry is not None]
    if not found:
        names = [n for (lib, n) in by_name if lib in libraries]
        close = difflib.get_close_matches(bare, names, n=3)
        raise InvalidModelError(f"No model {name!r} in {' or '.join(libraries)}.",
                                hint=f"did you mean {', '.join(close)}?" if close else
                                "list them with fxfeat.catalog(library=...) or `python -m fxfeat models`.")
    return found


def _compiled_now(library: str, name: str, named: bool) -> dict[str, Any] | None:
    """The entry of ``library:name`` compiled in this process (kept for later queries); ``None`` where the
    library has no such model and the query did not name the library."""
    key = (library, name)
    if key not in _compiled_here:
        from fxfeat.zoo.entry import catalog_entry

        entry = catalog_entry(library, name)
        if not named and entry["error"] and entry["error"].startswith("InvalidModelError"):
            return None
        _compiled_here[key] = entry
    return _compiled_here[key]


def _warn_if_other_versions(built: dict[str, str], library: str | None) -> None:
    versions = installed_versions()
    other = [lib for lib in ([library] if library else LIBRARIES)
             if versions[lib] is not None and versions[lib] != built[lib]]
    if other:
        warnings.warn(
            "The model catalog was built with " + ", ".join(f"{lib} {built[lib]}" for lib in other)
            + "; installed: " + ", ".join(f"{lib} {versions[lib]}" for lib in other) + ". Its entries are of those "
            "versions; a model named in the query (fxfeat.catalog('timm:NAME')) is compiled for the installed one.",
            FxFeatWarning, stacklevel=3)


def _copy(entry: dict[str, Any]) -> dict[str, Any]:
    copied = dict(entry)
    for key, value in entry.items():
        if isinstance(value, list):
            copied[key] = [dict(item) if isinstance(item, dict) else item for item in value]
    return copied
