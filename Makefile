# pfmon: the two commands users need are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test quick check lint types unit bench clean venv runtime-lock

venv: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@echo "pfmon: setting up $(VENV) - $$(grep -c '==' requirements.lock) pinned packages from requirements.lock (first run only, about a minute)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check --progress-bar on -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@echo "pfmon: $(VENV) is ready"
	touch $(STAMP)

## Run every service against simulated meters (embedded broker/database when none answers).
demo: $(STAMP)
	$(BIN)/pfmon demo $(ARGS)

## Lint + types + tests: exactly what CI runs.
test: check

check: lint types unit

lint: $(STAMP)
	$(BIN)/ruff check shared services tests bench
	$(BIN)/ruff format --check shared services tests bench

types: $(STAMP)
	$(BIN)/mypy shared services

# -rs: say why each skipped test was skipped; --durations: the slowest tests
unit: $(STAMP)
	$(BIN)/pytest -q -rs --durations=15 $(PYTEST_ARGS)

## Lint + types + the tests not marked slow (outages, brokers with ACLs, soaks): minutes, not ten.
quick: lint types
	$(BIN)/pytest -q -rs -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## requirements.runtime.lock (what the image installs): the run-time dependencies of
## pyproject.toml alone, resolved in a fresh venv at requirements.lock's pins.
runtime-lock:
	rm -rf var/runtime-lock && $(PYTHON) -m venv var/runtime-lock
	var/runtime-lock/bin/pip install --quiet --disable-pip-version-check -c requirements.lock .
	{ echo "# Run-time dependencies only, at requirements.lock's pins (the image installs this; regenerate: make runtime-lock)."; \
	  var/runtime-lock/bin/pip freeze --exclude-editable | grep -v '^pfmon @'; } > requirements.runtime.lock
	rm -rf var/runtime-lock

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
