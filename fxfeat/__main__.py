"""``python -m fxfeat``: see :mod:`fxfeat.cli`."""

from fxfeat.cli import main

main()
