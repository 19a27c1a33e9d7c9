# zoho-image-sync: `make demo` for a first run, `make test` for the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev demo test lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/zoho-image-sync -c config.toml demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q
	# The in-process pipeline once more with asyncio's debug mode (STYLE.md).
	PYTHONASYNCIODEBUG=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_pipeline.py

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools
	$(BIN)/mypy

# make bench: every scenario (about 15 minutes); make bench BENCH=quick skips the
# two-minute rate-limited pass. Writes bench/RESULTS.md (see bench/README.md).
BENCH ?=
bench: $(DEV_STAMP)
	sh bench/install-tools.sh $(BIN)
	BENCH_COMMAND="make bench$(if $(BENCH), BENCH=$(BENCH))" \
		$(BIN)/python -m bench.run $(if $(filter quick,$(BENCH)),--quick)

clean:
	rm -rf $(VENV) data demo-data .pytest_cache .mypy_cache .ruff_cache

SOAK_SECONDS ?= 600
soak: $(DEV_STAMP)
	$(BIN)/python tools/soak.py --seconds $(SOAK_SECONDS)
