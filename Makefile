# Set-up and everyday commands. `make demo` and `make test` are all a new clone needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEV_STAMP := $(VENV)/.dev-stamp
BENCH_STAMP := $(VENV)/.bench-stamp
DEMO_STATE := .histimport-demo

.PHONY: demo test lint types unit bench bench-memory clean

# The demo needs histimport alone; the tests add the dev tools.
# The dependencies at the versions the image pins (docker/requirements.txt), those the test
# suite runs with: a release made since does not change a fresh clone.
$(STAMP): pyproject.toml docker/requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . -c docker/requirements.txt
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]' -c docker/requirements.txt
	touch $(DEV_STAMP)

# A real import of samples/ into the bundled sandbox. The sample holds a few bad rows on
# purpose, so the import exits 1 and failed.json lists them; make treats 0 and 1 as success.
demo: $(STAMP)
	rm -rf $(DEMO_STATE)
	$(BIN)/histimport load samples/export.jsonl --sandbox --state-dir $(DEMO_STATE) \
		--report report.json; status=$$?; \
	echo "histimport exited $$status; see failed.json and report.json"; \
	test $$status -le 1

test: lint types unit

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(DEV_STAMP)
	$(BIN)/mypy

unit: $(DEV_STAMP)
	$(BIN)/pytest

$(BENCH_STAMP): $(DEV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' -c docker/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py
	$(BIN)/python bench/pacing.py
	$(BIN)/python bench/stream.py

# 400,000 messages interleaving 8,000 customers: peak RSS and requests against the ideal.
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) $(DEMO_STATE) .pytest_cache .mypy_cache .ruff_cache failed.json report.json
