# Finsight — every target sets itself up (virtualenv, install, code generation),
# so a fresh clone needs nothing but `make run` or `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
PROTO_STAMP := .build/proto.stamp
PYTEST_ARGS ?=

.PHONY: help venv proto run test lint bench clean env-example

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(INSTALLED)  ## create .venv and install the project with dev tools

$(PROTO_STAMP): $(INSTALLED) $(PROTOS) buf.yaml
	@rm -rf .build/proto-deps && mkdir -p .build/proto-deps/google/type .build/proto-deps/google/rpc
	@gp=$$($(PY) -c 'import google.type.date_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[1])'); \
	  cp $$gp/type/{date,money,decimal}.proto .build/proto-deps/google/type/; \
	  cp $$gp/rpc/{status,code,error_details}.proto .build/proto-deps/google/rpc/
	find protos -name '*_pb2*.py*' -delete
	$(PY) -m grpc_tools.protoc -I protos -I .build/proto-deps \
	  --python_out=protos --mypy_out=quiet:protos \
	  --grpc_python_out=protos --mypy_grpc_out=quiet:protos \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  $(PROTOS)
	@touch $@

proto: $(PROTO_STAMP)  ## generate Python code (+ .pyi stubs) from protos/

# STORE=postgres: the production topology (a local PostgreSQL, two memory and two
# analytics replicas); the default is the embedded one (DuckDB files).
STORE ?= duckdb

run: $(PROTO_STAMP)  ## run the whole suite locally (embedded Redis unless REDIS_URL is set; STORE=postgres for the production topology)
	$(PY) -m libs.common.devstack --store $(STORE)

# Line coverage may not fall below this (raise it as the suite grows).
COVERAGE_FLOOR ?= 92

test: $(PROTO_STAMP)  ## run the test suite with line and branch coverage per package
	$(PY) -m pytest -m 'not slow' --cov --cov-report=xml --cov-report= $(PYTEST_ARGS)
	$(PY) .ci/coverage_by_package.py .build/coverage.xml --fail-under $(COVERAGE_FLOOR)

NODE_TOOLS := .ci/node_modules/.installed
$(NODE_TOOLS): .ci/package.json
	cd .ci && npm install --silent --no-audit --no-fund
	@touch $@

lint: $(PROTO_STAMP) $(NODE_TOOLS)  ## ruff, mypy, buf lint, actionlint, hadolint, kustomize + schema validation
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services tests benchmarks
	$(BIN)/buf lint
	node .ci/actionlint.mjs .github/workflows/*.yml
	bash deploy/lint.sh

bench: $(PROTO_STAMP)  ## run the benchmarks (figures are ratios against baselines of the same run)
	$(PY) -m benchmarks

clean:  ## remove the virtualenv, generated code, caches and local data
	rm -rf $(VENV) .build var .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
	find protos -name '*_pb2*.py*' -delete
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

.PHONY: chaos
chaos: $(PROTO_STAMP)  ## fault-injection suite against the running system (slow; figures in .build/chaos-figures.jsonl)
	SYSTEM_FIGURES_FILE=.build/chaos-figures.jsonl $(PY) -m pytest -m slow -k chaos tests/system/test_faults.py tests/system/test_replicas.py -v $(PYTEST_ARGS)

.PHONY: fuzz
fuzz: $(PROTO_STAMP)  ## the full property-based fuzzing and security suites (slow), on DuckDB and PostgreSQL
	$(PY) -m pytest -m slow -s tests/fuzz tests/security $(PYTEST_ARGS)

.PHONY: soak
soak: $(PROTO_STAMP)  ## mixed-workload soak and capacity probe (SOAK_DURATION_S, default 600 s)
	$(PY) -m benchmarks.soak

.PHONY: restore-drill
restore-drill: $(PROTO_STAMP)  ## back up memory and analytics under writes, restore, verify, time the recovery (STORE=postgres: pg_dump/pg_restore; RESTORE_DRILL_ARGS=--json)
	@$(PY) -m libs.common.restore_drill --store $(STORE) $(RESTORE_DRILL_ARGS)

.PHONY: docs
docs: $(PROTO_STAMP)  ## regenerate docs/api.md from the proto comments
	$(PY) -m libs.common.apidoc > docs/api.md

.PHONY: env-example
env-example: $(INSTALLED)  ## regenerate .env.example from the settings models
	$(PY) -m libs.common.envdoc > .env.example
