# fxfeat: `make demo` and `make test` work from a fresh clone (they install what they need first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch and torchvision are pinned to the builds that lie on the development machines' disk.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-zoo bench bench-extract coverage catalog pictures lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test,onnx,bench,extract,plot]" $(TORCH_PINS)
	touch $(STAMP)

demo: install
	$(PY) -m fxfeat demo

test: install
	$(PY) -m pytest -q

test-zoo: install
	$(PY) -m pytest -q -m zoo

bench: install
	$(PY) -m benchmarks.run --device cpu --out docs/benchmarks.json --markdown docs/benchmarks.md --plot docs/benchmarks.png

bench-extract: install
	$(PY) -m benchmarks.extract --out docs/extract.json --markdown docs/extract-benchmark.md
	$(PY) -m benchmarks.extract --models resnet50 open_clip:ViT-B-32 --compute-dtype auto --http-images 0 --rss-images \
		--out docs/extract-bfloat16.json --markdown docs/extract-benchmark-bfloat16.md

coverage: install
	$(PY) -m benchmarks.coverage --out docs/coverage.json --markdown docs/coverage.md
	$(PY) -m benchmarks.coverage_pictures --report docs/coverage.json --markdown docs/coverage.md

catalog: install
	$(PY) -m benchmarks.catalog --out fxfeat/zoo/catalog.json.gz --page docs/catalog.md

pictures: install
	$(PY) -m benchmarks.pictures --out docs/pictures

lint: install
	$(PY) -m pip install -q ruff && $(PY) -m ruff check fxfeat tests benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
