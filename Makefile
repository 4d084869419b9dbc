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

.PHONY: run test setup gen lint breaking pytest compose-smoke images compose-up compose-down bench clean

## run: set up (once) and start Envoy + every service; Ctrl-C stops all.
run: setup
	$(BIN)/mlmesh-run $(if $(OBSERVE),--observe)

## test: set up, then contracts (lint, breaking), code lint, the test suite,
## and the mesh in containers (images, Compose, checks through Envoy).
test: setup lint breaking pytest compose-smoke

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
	bash scripts/checkov.sh

breaking:
	@if git rev-parse --verify -q main >/dev/null && git ls-tree -r --name-only main | grep -q '^protos/'; then \
	  $(BIN)/buf breaking protos --against '$(BREAKING_AGAINST),subdir=protos' && echo "buf breaking: no breaking change against main"; \
	else echo "buf breaking: no contracts on main yet; nothing to compare"; fi

pytest:
	@scripts/ensure-services.sh
	$(BIN)/python -m pytest

## compose-smoke: Docker engine, images, `docker-compose up`, the checks through
## Envoy, down/up on the volumes, teardown (scripts/compose-smoke.sh).
compose-smoke: setup
	bash scripts/compose-smoke.sh

## images: every image (deploy/docker/Dockerfile), on a local base where no registry answers.
images: setup
	bash scripts/docker-engine.sh
	bash scripts/build-images.sh

## compose-up / compose-down: the whole mesh in containers (deploy/compose/), state in named volumes.
compose-up: images
	docker-compose -f deploy/compose/docker-compose.yml up -d
compose-down:
	docker-compose -f deploy/compose/docker-compose.yml down

bench:
	$(BIN)/python bench/envoy_overhead.py
	$(BIN)/python bench/registry_resolve.py
	$(BIN)/python bench/registry_artifacts.py

clean:
	rm -rf .mlmesh libs/contracts/src/mlmesh libs/contracts/src/buf
