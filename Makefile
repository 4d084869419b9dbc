# mlmesh: the two commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
# What `buf breaking` compares the contracts with (a branch of this clone);
# only protos/ is compared (third_party/proto is vendored).
BREAKING_AGAINST ?= .git\#branch=main

# The hand-written code mypy checks: every library's and service's src
# (the generated contracts are excluded in pyproject.toml).
TYPED := $(filter-out libs/contracts/src,$(wildcard libs/*/src services/*/src))

.PHONY: run test setup gen lint breaking pytest bench clean

## run: set up (once) and start Envoy + every service; Ctrl-C stops all.
run: setup
	$(BIN)/mlmesh-run $(if $(OBSERVE),--observe)

## test: set up, then contracts (lint, breaking), code lint, and the test suite.
test: setup lint breaking pytest

setup:
	@scripts/setup.sh

gen:
	$(BIN)/buf generate

lint:
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy $(TYPED)
	@command -v promtool >/dev/null || bash scripts/setup-observe.sh
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml

breaking:
	@if git rev-parse --verify -q main >/dev/null && git ls-tree -r --name-only main | grep -q '^protos/'; then \
	  $(BIN)/buf breaking protos --against '$(BREAKING_AGAINST),subdir=protos' && echo "buf breaking: no breaking change against main"; \
	else echo "buf breaking: no contracts on main yet; nothing to compare"; fi

pytest:
	@scripts/ensure-services.sh
	$(BIN)/python -m pytest

bench:
	$(BIN)/python bench/envoy_overhead.py
	$(BIN)/python bench/registry_resolve.py
	$(BIN)/python bench/registry_artifacts.py

clean:
	rm -rf .mlmesh libs/contracts/src/mlmesh libs/contracts/src/buf
