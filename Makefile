# KiteQ: one repository, many Go modules. Every target finds the modules with
# the find below (no list to keep up to date) and fans out per module with
# pattern rules: build/<module>, vet/<module>, tidy-check/<module>,
# test/<module>, bench/<module>. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

GO ?= go

# Module directories, relative to the root, without "./": protocol registry ...
ALL_MODULES := $(sort $(patsubst ./%,%,$(shell find . -name go.mod -not -path './.git/*' -not -path '*/testdata/*' -exec dirname {} \;)))
# MODULES restricts the per-module targets: make test MODULES="protocol storage"
MODULES ?= $(ALL_MODULES)
override MODULES := $(patsubst %/,%,$(patsubst ./%,%,$(MODULES)))
UNKNOWN_MODULES := $(filter-out $(ALL_MODULES),$(MODULES))
ifneq ($(UNKNOWN_MODULES),)
$(error unknown module(s) in MODULES: $(UNKNOWN_MODULES) (modules: $(ALL_MODULES)))
endif

# go test flags added to the defaults: make test TESTFLAGS=-short
TESTFLAGS ?=
export TESTFLAGS

# make run: the broker in the foreground, its data in ./data.
DB ?= file://./data
TOPICS ?=
# make run accepts any client on loopback (-auth=open, which the broker logs);
# AUTH_FILE=path requires the groups of that file instead.
AUTH_FILE ?=
RUNFLAGS ?=

# make gobench: BENCH is the -bench regexp, BENCHTIME optional (e.g. 2s, 1000x).
# make bench: BENCHFLAGS go to kiteq-bench suite (e.g. -duration=10s).
BENCH ?= .
BENCHFLAGS ?=
BENCHTIME ?=

.PHONY: help
help: ## list the targets
	@echo 'usage: make <target> [MODULES="a b"] [TESTFLAGS=...]'
	@echo
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_%/-]+:.*## / {printf "  %-18s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo 'modules: $(ALL_MODULES)'

.PHONY: modules
modules: ## print the module directories found
	@printf '%s\n' $(ALL_MODULES)

.PHONY: tools
tools: ## install protoc (apt, as root), protoc-gen-go into ./bin, gcc for -race
	@scripts/install-tools.sh

# --- workspace -------------------------------------------------------------

.PHONY: work work-check
work: ## generate go.work from the modules found (commit it)
	@scripts/gen-work.sh

work-check: ## fail if go.work differs from a fresh generation
	@scripts/gen-work.sh --check

# --- build and checks ------------------------------------------------------

.PHONY: build vet tidy-check fmt-check proto proto-check deps-check checks
build: $(MODULES:%=build/%) ## go build ./... in each module
build/%:
	@echo '>> go build ./... in $*'
	@cd $* && $(GO) build ./...

vet: $(MODULES:%=vet/%) ## go vet ./... in each module
vet/%:
	@echo '>> go vet ./... in $*'
	@cd $* && $(GO) vet ./...

tidy-check: $(MODULES:%=tidy-check/%) ## fail if go mod tidy would change a module's go.mod/go.sum
tidy-check/%:
	@echo '>> go mod tidy -diff in $*'
	@cd $* && $(GO) mod tidy -diff || { echo "tidy-check: module $* is not tidy: run 'go mod tidy' in $*"; exit 1; }

fmt-check: ## fail listing the Go files that gofmt would change (not *.pb.go)
	@scripts/fmt-check.sh

proto: ## regenerate protocol/kiteq.pb.go (protoc 3.21.x, protoc-gen-go v1.36.12)
	@scripts/proto.sh

proto-check: ## fail if protocol/kiteq.pb.go differs from a regeneration
	@scripts/proto.sh --check

deps-check: ## check module import rules, client-go's closure, versions, internal/
	@scripts/deps-check.sh $(MODULES)

checks: fmt-check vet tidy-check work-check proto-check deps-check ## all checks, no tests

# --- tests -----------------------------------------------------------------

.PHONY: test bench gobench
test: ## install tools, run all checks, then go test -race in each module
	@scripts/install-tools.sh
	@$(MAKE) --no-print-directory checks
	@scripts/test.sh $(MODULES)

test/%: ## go test -race in one module, no checks (e.g. make test/protocol)
	@scripts/test.sh $*

bench: ## the standard suite, KiteQ beside NATS JetStream and RabbitMQ: writes docs/benchmarks.md
	@scripts/bench.sh $(BENCHFLAGS)

gobench: $(MODULES:%=bench/%) ## go test -bench=BENCH -benchmem in each module (BENCH=., BENCHTIME=)
bench/%:
	@echo '>> go test -run=^$$ -bench=$(BENCH) -benchmem $(if $(BENCHTIME),-benchtime=$(BENCHTIME)) ./... in $*'
	@cd $* && $(GO) test -run='^$$' -bench='$(BENCH)' -benchmem $(if $(BENCHTIME),-benchtime=$(BENCHTIME)) ./...

# --- run and release -------------------------------------------------------

.PHONY: run release
run: ## run the broker: DB=file://./data TOPICS=a,b AUTH_FILE=path RUNFLAGS=...
	$(GO) run ./broker/cmd/kiteq -bind=127.0.0.1:13800 -pport=13801 -db='$(DB)' -topics='$(TOPICS)' \
		$(if $(AUTH_FILE),-auth-file='$(AUTH_FILE)',-auth=open) $(RUNFLAGS)

release: ## tag a module release: MODULE=client-go VERSION=v0.1.0 [DRY_RUN=1]
	@DRY_RUN='$(DRY_RUN)' scripts/release.sh '$(MODULE)' '$(VERSION)'
