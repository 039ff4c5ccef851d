# The first target that needs Python creates .venv and installs the package into it, so a fresh
# clone needs nothing else. STATE picks the state directory; ARGS passes more flags through.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
STATE  ?= state
RUN    := $(BIN)/reconciler --state $(STATE)

.PHONY: reconcile plan validate status renew test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

reconcile: $(STAMP) ## validate, plan and apply state/users.yaml
	$(RUN) apply $(ARGS)

plan: $(STAMP) ## show what reconcile would do (no secrets needed)
	$(RUN) plan $(ARGS)

validate: $(STAMP) ## check state/users.yaml (no secrets needed)
	$(RUN) validate

status: $(STAMP) ## certificates on disk, with days left
	$(RUN) status $(ARGS)

renew: $(STAMP) ## what the scheduled job runs: renewals and CRL refresh
	$(RUN) apply $(ARGS)

test: $(STAMP) ## the test suite
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check reconciler tests
	$(BIN)/ruff format --check reconciler tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
