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

.PHONY: venv reconcile plan validate status renew export hba adopt test lint bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.runtime ## create .venv and install the reconciler (the pipelines do it before the secrets)

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

# Deploy files: make export NAME=cmdb LAYOUT=libpq OUT=~/.postgresql (ARGS="--force" to replace)
export: $(VENV)/.runtime
	$(RUN) export $(NAME) --layout $(LAYOUT) --out $(OUT) $(ARGS)

hba: $(VENV)/.runtime ## the pg_hba.conf lines; ARGS="--check /etc/postgresql/15/main/pg_hba.conf"
	$(RUN) hba $(ARGS)

# Make this clone your team's state repository: from now on apply commits the CA, the
# certificates, the CRL and the ledger (this project's own repository ignores them).
adopt:
	sed -i '/^# >>> reconciler project only/,/^# <<< reconciler project only/d' .gitignore
	git add .gitignore
	git commit --quiet -m "Adopt this repository as our state repository: commit issued files" -- .gitignore
	@echo "Adopted: the next 'make reconcile' commits the state directory."

test: $(VENV)/.dev ## the test suite
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.dev ## ruff and mypy --strict
	$(BIN)/ruff check reconciler tests bench
	$(BIN)/ruff format --check reconciler tests bench
	$(BIN)/mypy

bench: $(VENV)/.dev ## benchmarks (not part of test); ARGS="--quick" or "--with-100k"
	$(BIN)/python bench/bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
