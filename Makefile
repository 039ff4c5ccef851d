# The first target that needs Python creates .venv and installs what it needs into it, so a
# fresh clone needs nothing else. STATE picks the state directory; ARGS passes more flags.
PYTHON          ?= python3
VENV            := .venv
BIN             := $(VENV)/bin
STATE           ?= state
RUN             := $(BIN)/reconciler --state $(STATE)
WARN_DAYS       ?= 7
PROMETHEUS_FILE ?=
PROMETHEUS      := $(if $(PROMETHEUS_FILE),--prometheus $(PROMETHEUS_FILE))

.PHONY: reconcile plan validate status renew test lint bench schema-check clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

reconcile: $(VENV)/.runtime ## validate, plan, apply and commit state/users.yaml
	$(RUN) apply $(ARGS)

plan: $(VENV)/.runtime ## show what reconcile would do (no secrets needed)
	$(RUN) plan $(ARGS)

validate: $(VENV)/.runtime ## check state/users.yaml (no secrets needed)
	$(RUN) validate

status: $(VENV)/.runtime ## certificates on disk, with days left
	$(RUN) status $(ARGS)

# What the scheduled jobs run: renewals and CRL refresh, committed and pushed; then fail when
# anything still runs out within WARN_DAYS days, so a broken renewal pages someone in time.
renew: $(VENV)/.runtime
	$(RUN) apply --push $(PROMETHEUS) $(ARGS)
	$(RUN) status --warn-days $(WARN_DAYS) $(PROMETHEUS)

test: $(VENV)/.dev ## the test suite
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.dev ## ruff and mypy --strict
	$(BIN)/ruff check reconciler tests bench
	$(BIN)/ruff format --check reconciler tests bench
	$(BIN)/mypy

bench: $(VENV)/.dev ## benchmarks of issue 6 (not part of test); ARGS="--quick" or "--with-100k"
	$(BIN)/python bench/bench.py $(ARGS)

# reconciler/schema_check.py is generated from the schema and committed; a test fails when it is
# stale. Run this after editing schema/users.schema.json.
schema-check: reconciler/schema_check.py ## regenerate the validator made from the schema

reconciler/schema_check.py: schema/users.schema.json reconciler/schema_codegen.py | $(VENV)/.runtime
	$(BIN)/python -m reconciler.schema_codegen schema/users.schema.json > $@.tmp
	mv $@.tmp $@

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
