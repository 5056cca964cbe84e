# Everything installs itself into the repo-local virtualenv .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install test demo pipeline tokenize rerun server server-stop serve deploy worker bench

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# ---- pipeline (flows/): Prefect state and results stay in the repo, nothing reaches the network
# A rerun of a stage whose run was interrupted (Ctrl-C) continues it; RESTART=1 starts it from nothing.
LEASE := $(VENV)/bin/lease
CONFIG ?= demo
ARGS ?=
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY := false
PREFECT_PORT ?= 4200
PREFECT_HOST ?= 127.0.0.1
LOCAL_API := http://127.0.0.1:$(PREFECT_PORT)/api
# serve/deploy/worker talk to the server named by PREFECT_API_URL (another machine's), else the local one
API := $(or $(PREFECT_API_URL),$(LOCAL_API))
POOL ?= lease-gpu

demo: $(STAMP)  ## the whole flow on the generated demo set (no server needed; second run: all cached)
	$(LEASE) run --config demo $(ARGS)

pipeline: $(STAMP)  ## the whole flow on your ImageFolder with the demo preset's models: make pipeline DATA=/path
	@test -n "$(DATA)" || { echo "usage: make pipeline DATA=/path/to/ImageFolder"; exit 2; }
	$(LEASE) run --config $(CONFIG) data.source=$(abspath $(DATA)) $(ARGS)

tokenize: $(STAMP)  ## the tokenization sub-flow (manifest → features → k-means → tokenize → pack); DATA= optional
	$(LEASE) run --flow tokenize --config $(CONFIG) $(if $(DATA),data.source=$(abspath $(DATA))) $(ARGS)

rerun: $(STAMP)  ## recompute one stage and its dependents, the rest from cache: make rerun STAGE=pretrain
	@test -n "$(STAGE)" || { echo "usage: make rerun STAGE=<stage> [RESTART=1] (demo-data demo-assets manifest features kmeans vq-codes tokenize pack pretrain evaluate report)"; exit 2; }
	$(LEASE) run --config $(CONFIG) --force $(STAGE) $(if $(RESTART),--restart) $(if $(DATA),data.source=$(abspath $(DATA))) $(ARGS)

server: $(STAMP)  ## local Prefect server in the background (SQLite in .prefect/); stop with make server-stop
	$(PY) -m prefect server start --background --host $(PREFECT_HOST) --port $(PREFECT_PORT)
	PREFECT_API_URL=$(LOCAL_API) $(PY) -m prefect server status --wait --timeout 120  # returns once it answers
	@echo "Prefect server at $(LOCAL_API) (UI http://127.0.0.1:$(PREFECT_PORT)); export PREFECT_API_URL=$(LOCAL_API)"

server-stop: $(STAMP)
	$(PY) -m prefect server stop

serve: $(STAMP)  ## serve lease/full-pipeline from this process (blocks; Ctrl-C stops it); then: prefect deployment run lease/full-pipeline
	PREFECT_API_URL=$(API) $(PY) -m flows.deploy --config $(CONFIG) $(ARGS)

deploy: $(STAMP)  ## lease/full-pipeline on the process work pool $(POOL) (created if missing), run by its workers
	PREFECT_API_URL=$(API) $(PY) -m flows.deploy --pool $(POOL) --config $(CONFIG) $(ARGS)

worker: $(STAMP)  ## a process worker of pool $(POOL): runs its flow runs here, in this checkout (LEASE_REPO)
	LEASE_REPO=$(CURDIR) PREFECT_API_URL=$(API) $(PY) -m prefect worker start --pool $(POOL) --type process $(ARGS)

bench: $(STAMP)  ## GPU benchmarks (records under benchmarks/results/)
	$(LEASE) bench train $(ARGS)
