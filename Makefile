# visionserve: `make run` serves, `make test` tests. Both set up everything they need.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup models run test test-fast lint bench kuberay browser clean

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
	$(VENV)/bin/serve run config/serve.yaml

# Headless Chromium for the web page test (Debian packages; skipped where apt is absent).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium not installed: the browser test will skip"; }

test: setup browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m bench

kuberay: setup
	$(PY) -m kuberay.generate

clean:
	rm -rf $(VENV) .pytest_cache bench/results
