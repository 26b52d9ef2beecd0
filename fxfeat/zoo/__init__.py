"""The catalog of every timm and torchvision classification model: ``fxfeat.catalog(...)``
(:mod:`fxfeat.zoo.query`) and ``python -m fxfeat models``. Each model's entry (:mod:`fxfeat.zoo.entry`) is built
by ``make catalog`` (``benchmarks/catalog.py``) and shipped in ``fxfeat/zoo/catalog.json.gz``, read on the first
query, not on ``import fxfeat``. See docs/catalog.md."""

from fxfeat.zoo.query import catalog

__all__ = ["catalog"]
