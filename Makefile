# The README's two commands: `make bench` (the main job) and `make test`.
# Each creates the virtual environment on first use (torch pinned to the build this
# machine's mirror serves; pyproject.toml itself only asks for torch>=2.2).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: venv bench test lint clean

# The library, then tokenmerge-bench (benchmarks/: the bench, its photographs and the reference
# models, tooling kept out of the library's wheel), then the example plugin.
$(STAMP): pyproject.toml benchmarks/pyproject.toml Makefile \
		examples/tokenmerge-plugin-example/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[test,docs]"
	$(PY) -m pip install --quiet -e benchmarks
	$(PY) -m pip install --quiet -e examples/tokenmerge-plugin-example
	touch $(STAMP)

venv: $(STAMP)

# the README's main job: SD 1.5 at 512 px, no merging vs retom / tome / random / todo (and tomesd)
BENCH_OUT ?= bench-results
bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(VENV)/bin/tokenmerge bench --json $(BENCH_OUT)/results.json \
		--plot $(BENCH_OUT)/speedup_vs_block_error.png $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest $(ARGS)

.PHONY: hotpaths
# pytest-benchmark timings of planning, merge, unmerge and one attention site (benchmarks/)
hotpaths: $(STAMP)
	$(VENV)/bin/pytest benchmarks --benchmark-enable $(ARGS)

.PHONY: docs
# the documentation site, as CI builds it (strict: any warning fails), then its internal links
# and anchors checked offline (external ones only listed); open site/index.html
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict -d site
	$(PY) docs/check_links.py site

.PHONY: figures
# the docs' pictures, remade with today's defaults by the tokenmerge command (benchmarks/
# docs_figures.py; about 8 minutes on 2 cores): FIGURES="merges-sd15" makes one
figures: $(STAMP)
	$(PY) benchmarks/docs_figures.py $(FIGURES)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) bench-results .venv-wheel .venv-min build dist *.egg-info .pytest_cache .hypothesis
