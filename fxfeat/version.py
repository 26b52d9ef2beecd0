"""fxfeat's version: a leaf any module may import (the package face re-exports it as ``fxfeat.__version__``)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
