# visionserve: `make run` serves, `make test` tests. Both set up everything they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup models run test test-fast test-tools lint bench kuberay lock lock-torch clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fetch what can be fetched; the service still starts without the rest (it answers 503
# with the exact fetch command for a model whose weights are missing).
models: setup
	$(PY) -m serve_app.models fetch --config config/serve.yaml --keep-going

run: setup models
	$(PY) -m serve_app.config check config/serve.yaml
	# Serve's proxy refuses over-cap bodies from the headers (serve_app/proxy.py).
	env $$($(PY) -m serve_app.proxy config/serve.yaml) $(VENV)/bin/serve run config/serve.yaml

# Test tools from Debian: headless Chromium (web page test) and shellcheck (minikube.sh).
# Where apt is absent or fails, the tests that need them skip with a reason.
TEST_TOOLS := chromium shellcheck
test-tools:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "installing$$missing (apt-get)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "could not install$$missing: the tests that need them will skip"; \
	  else echo "no apt-get:$$missing missing; the tests that need them will skip"; fi; \
	fi

# CI runs this (.ci/run): lint first, so an unformatted file fails in seconds, then every test.
test: setup test-tools lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only: nothing that starts Ray (the `service` marker) or runs long.
test-fast: setup
	$(PY) -m pytest -m "not slow and not service" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m bench

kuberay: setup
	$(PY) -m kuberay.generate

# The image's lock files (kuberay/Dockerfile), with sha256 hashes, resolved from PyPI for
# Linux x86_64 / Python 3.11. requirements.lock leaves torch/torchvision out (the CPU wheels
# come from the PyTorch index: kuberay/torch-cpu.lock); requirements-gpu.lock is PyPI's CUDA
# torch with everything it pulls. Then `make kuberay`: the image tag follows the locks.
UV ?= uv
UV_COMPILE := $(UV) pip compile --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple \
	--no-header --annotation-style line
lock:
	$(UV_COMPILE) pyproject.toml kuberay/requirements.in \
	  --override kuberay/torch-overrides.txt -o kuberay/requirements.lock
	$(UV_COMPILE) pyproject.toml -o kuberay/requirements-gpu.lock

# Where download.pytorch.org is reachable: print the --hash lines of the CPU wheels pinned in
# kuberay/torch-cpu.lock, to paste there (pip then checks them).
lock-torch:
	tmp=$$(mktemp -d) && $(PY) -m pip download --no-deps --only-binary :all: \
	  --python-version 3.11 --platform manylinux_2_28_x86_64 \
	  --index-url https://download.pytorch.org/whl/cpu -r kuberay/torch-cpu.lock -d $$tmp \
	  && $(PY) -m pip hash $$tmp/*.whl; rm -rf $$tmp

clean:
	rm -rf $(VENV) .pytest_cache bench/results
