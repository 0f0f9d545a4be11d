# unimm: `make train` and `make test` bootstrap their own virtual environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch must be named first (or with the rest): an unpinned resolve pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= cpu,dev
STAMP  := $(VENV)/.installed

.PHONY: install train test test-full test-gpu bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[$(EXTRAS)]"
	touch $(STAMP)

## Train the default (bundled toy) experiment on CPU: builds the toy dataset once, trains, prints the retrieval table.
train: install
	$(PY) -m unimm.train $(ARGS)

# Two test processes (one per core; each file stays on one process so its expensive fixtures run once).
XDIST  ?= -n 2 --dist loadfile

## Fast suite: CPU only, no network.
test: install
	$(PY) -m pytest -m "not slow and not gpu" -q $(XDIST) $(ARGS)

test-full: install
	$(PY) -m pytest -m "not gpu" -q $(XDIST) $(ARGS)

test-gpu: install
	$(PY) -m pytest -m gpu -q $(ARGS)

bench: install
	@for f in experiments/benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

lint: install
	$(PY) -m ruff check unimm tests experiments

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
