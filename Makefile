# The first target that needs Python creates .venv and installs what it needs into it, so a
# fresh clone needs nothing else. ARGS passes more flags.
#
# Environments: each state/ENV/users.yaml is one, with its own CA (ENV=acc picks state/acc); a
# repository without them uses state/ itself, and STATE=DIR names any state directory. validate
# and renew run for every environment unless one is named; SINCE=REF keeps only those a change
# since REF touched (what the pipelines run). In PROMETHEUS_FILE and INVENTORY, % is the
# environment's name.
SHELL           := /bin/bash
PYTHON          ?= python3
VENV            := .venv
BIN             := $(VENV)/bin
WARN_DAYS       ?= 7
PROMETHEUS_FILE ?=
INVENTORY       ?=
ENVIRONMENTS    := $(patsubst %/users.yaml,%,$(wildcard state/*/users.yaml))
ifneq ($(ENV),)
STATE           ?= state/$(ENV)
endif
MIXED           := $(and $(ENVIRONMENTS),$(wildcard state/users.yaml))
ALL_STATES       = $(if $(MIXED),$(error state/users.yaml and state/ENV/users.yaml both exist: \
                   move state/users.yaml and its files into an environment, state/NAME/),$\
                   $(or $(STATE),$(ENVIRONMENTS),state))
# A change to the schema, to any .gitattributes, or a diff git cannot make concerns them all.
CHANGED         := $(if $(SINCE),$(shell git diff --name-only $(SINCE) -- 2>/dev/null || echo --all--))
EVERYTHING       = $(filter --all-- schema/% .gitattributes %/.gitattributes,$(CHANGED))
STATES           = $(if $(SINCE),$(if $(EVERYTHING),$(ALL_STATES),$\
                   $(foreach s,$(ALL_STATES),$(if $(filter $(s)/%,$(CHANGED)),$(s)))),$(ALL_STATES))
ONE_STATE        = $(if $(filter 1,$(words $(ALL_STATES))),$(ALL_STATES),$\
                   $(error several environments ($(notdir $(ALL_STATES))): pick one with ENV=NAME))
RUN              = $(BIN)/reconciler --state $(ONE_STATE)

.PHONY: venv reconcile plan validate status renew rollout environments export hba adopt test lint \
	bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.rollout: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[rollout]'
	touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.runtime ## create .venv and install the reconciler (the pipelines do it before the secrets)

reconcile: $(VENV)/.runtime ## validate, plan, apply and commit state/users.yaml
	$(RUN) apply $(ARGS)

plan: $(VENV)/.runtime ## show what reconcile would do (no secrets needed)
	$(RUN) plan $(ARGS)

validate: $(VENV)/.runtime ## check users.yaml of every environment (no secrets needed)
	@status=0; for state in $(STATES); do $(BIN)/reconciler --state $$state validate || status=1; done; \
	exit $$status

status: $(VENV)/.runtime ## certificates on disk, with days left
	$(RUN) status $(ARGS)

environments: ## the state directories validate and renew would run for, one per line
	@for state in $(STATES); do echo $$state; done

# What the scheduled jobs run, for each environment: renewals and CRL refresh, committed and
# pushed; the rollout when INVENTORY is set; then fail when anything still runs out within
# WARN_DAYS days, so a broken renewal pages someone in time. One failed environment does not
# stop the others; make fails at the end.
renew: $(VENV)/.runtime $(if $(INVENTORY),$(VENV)/.rollout)
	@failed=; for state in $(STATES); do \
	  name=$${state##*/}; prom=$(PROMETHEUS_FILE); prom=$${prom//%/$$name}; \
	  inventory=$(INVENTORY); inventory=$${inventory//%/$$name}; \
	  echo "== renew $$state"; \
	  $(BIN)/reconciler --state $$state apply --push $${prom:+--prometheus $$prom} $(ARGS) \
	  && { [ -z "$$inventory" ] || { [ ! -e "$$inventory" ] \
	       && echo "no inventory $$inventory: no rollout for $$state"; } \
	       || $(BIN)/ansible-playbook -i $$inventory contrib/ansible/rollout.yml \
	          -e reconciler_state=$$state; } \
	  && $(BIN)/reconciler --state $$state status --warn-days $(WARN_DAYS) \
	       $${prom:+--prometheus $$prom} \
	  || failed="$$failed $$state"; \
	done; \
	if [ -n "$$failed" ]; then echo "make renew failed for:$$failed" >&2; exit 1; fi

# Deploy to the hosts of an Ansible inventory (contrib/ansible/README.md):
#   make rollout ENV=prod INVENTORY=inventory/prod.yml ARGS="--check --diff"
rollout: $(VENV)/.rollout
	$(BIN)/ansible-playbook -i $(subst %,$(notdir $(ONE_STATE)),$(INVENTORY)) \
	  contrib/ansible/rollout.yml -e reconciler_state=$(ONE_STATE) $(ARGS)

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
