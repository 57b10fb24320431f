# The README's two commands: `make serve` and `make test`. Both create .venv and install what is needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# Where no NVIDIA GPU is visible, install a CPU build of torch (a local +cpu wheel where the machine
# has one, else PyTorch's CPU index) instead of the multi-GB CUDA build. Override with TORCH_SPEC=...
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: serve test bench gpu-wheels lint clean

$(BIN)/.installed: pyproject.toml
	@if $(PYTHON) -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then \
	  echo "using the system's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c 'import torch' 2>/dev/null; then echo "torch already installed"; \
	elif [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	elif [ -n "$(HAVE_GPU)" ]; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q --only-binary=:all: "torch==2.13.0+cpu" 2>/dev/null \
	  || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(BIN)/pip install -q -e '.[test]'
	touch $@

serve: $(BIN)/.installed
	$(BIN)/wattproxy serve $(ARGS)

# Services the tests use (a PostgreSQL server, Prometheus, ...): each .ci/deps-*.sh installs its own
# Debian package when it is missing. The tests start and stop the servers themselves.
test: $(BIN)/.installed
	@for f in .ci/deps-*.sh; do [ ! -f "$$f" ] || bash "$$f" || exit 1; done
	$(BIN)/ruff check proxy backends tests bench
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/pip install -q -e '.[test,bench]'
	@# LiteLLM (compared against in proxy mode) pins many packages: it gets a virtualenv of its own
	test -x bench/_work/litellm/bin/litellm || { $(PYTHON) -m venv bench/_work/litellm && \
	  bench/_work/litellm/bin/pip install -q 'litellm[proxy]'; }
	@# wrk (Debian package) drives bench/overhead.py; installed when missing, with sudo only when not root
	@command -v wrk >/dev/null || { SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench.run_all

# The packages a bare GPU machine without network lacks (its image has torch, transformers, aiohttp,
# prometheus-client, nvidia-ml-py, uvloop), as CPython 3.12 x86-64 wheels in .whl/ for
# bench/gpu_check.sh; versions as installed here.
GPU_WHEELS := diffusers pydantic pydantic-core annotated-types typing-inspection typing-extensions \
  sqlalchemy greenlet aiosqlite platformdirs importlib-metadata lazy-importer orjson
gpu-wheels: $(BIN)/.installed
	mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $$($(BIN)/python -m pip list --format=freeze 2>/dev/null | grep -i -E \
	     "^($$(echo $(GPU_WHEELS) | tr ' ' '|' | sed 's/-/[-_]/g'))==")

lint: $(BIN)/.installed
	$(BIN)/ruff check proxy backends tests bench
	$(BIN)/ruff format --check proxy backends tests bench

clean:
	rm -rf $(VENV) .pytest_cache
