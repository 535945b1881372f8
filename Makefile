# Every target bootstraps its own environment from uv.lock; only python3 and make are assumed.
PYTHON ?= python3
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
RUN := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install system-deps test demo dev bench chaos lint clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.8

$(VENV)/.synced: uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --quiet
	@touch $@

install: $(VENV)/.synced

system-deps:  # Debian packages the tests need (chromium for tests/browser/); installed when missing
	scripts/system-deps.sh

test: install system-deps
	$(RUN) -m pytest -q

demo: install
	$(RUN) -m erp_pipelines.demo run

# make dev DEV_ARGS='--ui-port 3001 --sandbox-port 9711' when the default ports are taken
dev: install
	$(RUN) -m erp_pipelines.demo dev $(DEV_ARGS)

bench: install
	$(RUN) -m bench.run

chaos: install
	$(RUN) -m bench.chaos

lint: install
	$(VENV)/bin/ruff check erp_pipelines tests bench

clean:
	rm -rf $(VENV) $(TOOLS) .dagster_home data/demo
