"""The code blocks of the guides run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks(name: str) -> list[str]:
    return _BLOCK.findall((DOCS / name).read_text())


@pytest.mark.parametrize("index", range(len(_blocks("training.md"))))
def test_training_guide_code_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide saves a detector to the working directory
    exec(compile(_blocks("training.md")[index], f"docs/training.md block {index}", "exec"), {})


@pytest.mark.parametrize("index", range(len(_blocks("inference.md"))))
def test_inference_guide_code_runs(index):
    exec(compile(_blocks("inference.md")[index], f"docs/inference.md block {index}", "exec"), {})


def test_extract_guide_code_runs(tmp_path, monkeypatch):
    """The blocks share one namespace, as a reader runs them one after another, in a folder with photos/."""
    from test_extract import make_folder

    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "photos", count=6)
    namespace: dict = {}
    for index, block in enumerate(_blocks("extract.md")):
        exec(compile(block, f"docs/extract.md block {index}", "exec"), namespace)
