# bulkops — the front door. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo
# End-to-end tests each run a producer and workers; a few at a time suit a 2-core machine.
E2E_THREADS ?= 3

.PHONY: help
help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

.PHONY: build
build: ## Build every program (debug)
	$(CARGO) build --workspace --locked

.PHONY: release
release: ## Build every program (release)
	$(CARGO) build --release --locked -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-cli

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: ## cargo fmt --check, clippy with warnings as errors, cargo deny (licences, bans, sources; deny.toml)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) fetch --locked
	$(CARGO) deny --offline check licenses bans sources

.PHONY: test-unit
test-unit: ## Unit tests (pure domain rules; no services)
	$(CARGO) test --workspace --locked --lib --bins

.PHONY: test-e2e
test-e2e: build ## End-to-end tests against real PostgreSQL, RabbitMQ and Redis
	$(CARGO) test -p bulkops-tests --locked --test e2e -- --test-threads=$(E2E_THREADS)

.PHONY: test-faults
test-faults: build ## The fault suite (FAULT_RUNS=n repeats each scenario); writes docs/RELIABILITY.md's table
	rm -f target/reliability/results.jsonl
	FAULT_RUNS=$${FAULT_RUNS:-1} $(CARGO) test -p bulkops-tests --locked --test faults -- --test-threads=2
	bash scripts/reliability-table.sh > target/reliability/table.md
	python3 scripts/update-reliability-doc.py target/reliability/table.md "make test-faults FAULT_RUNS=$${FAULT_RUNS:-1}"

.PHONY: test-faults-ci
test-faults-ci: build ## The fault suite, each scenario once (part of make test)
	$(CARGO) test -p bulkops-tests --locked --test faults -- --test-threads=2

.PHONY: test-cluster
test-cluster: build ## The cluster suite: clustered RabbitMQ, Redis and PostgreSQL losing nodes (CLUSTER_RUNS=n repeats it and writes docs/RELIABILITY.md's cluster table)
	rm -f target/reliability/cluster.jsonl
	CLUSTER_RUNS=$${CLUSTER_RUNS:-1} $(CARGO) test -p bulkops-tests --locked --test cluster -- --test-threads=1
	@if [ -n "$${CLUSTER_RUNS:-}" ]; then \
	  bash scripts/reliability-table.sh target/reliability/cluster.jsonl > target/reliability/cluster-table.md && \
	  python3 scripts/update-reliability-doc.py target/reliability/cluster-table.md "make test-cluster CLUSTER_RUNS=$${CLUSTER_RUNS}" cluster; \
	fi

.PHONY: test-chart
test-chart: ## Helm chart (lint, render, Kubernetes schemas), dashboard and compose checks
	bash tests/chart/run.sh

.PHONY: test
test: lint test-unit test-e2e test-faults-ci test-cluster test-chart ## The whole suite (what CI runs)

.PHONY: clean
clean: ## Remove build output
	$(CARGO) clean

N ?= 100000
BIG ?= 1000000
RUNS ?= 3

.PHONY: bench
bench: ## Benchmark against the set-based limit (N=100000 Individuals, BIG=1000000, RUNS=3 medians; BIG=0 skips the big run, N=… ARGS="--env KEY=VALUE" measures a variant); writes docs/PERFORMANCE.md
	$(CARGO) build --release --locked -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-tests --bin bulkops-bench --bin bulkops-producer --bin bulkops-worker
	BULKOPS_BIN_DIR=target/release target/release/bulkops-bench --individuals $(N) --big $(BIG) --runs $(RUNS) $(ARGS)

CLUSTER_N ?= 200000
CLUSTER_BENCH_RUNS ?= 3

.PHONY: bench-cluster
bench-cluster: ## Bulk-create records/s on a 3-node RabbitMQ cluster (with a standalone Redis, then a Redis Cluster) against one node, amqp.bulk_queues 1 and 3, in one run (CLUSTER_N=200000 Individuals, CLUSTER_BENCH_RUNS=3 medians); writes docs/PERFORMANCE.md
	$(CARGO) build --release --locked -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-tests --bin bulkops-bench --bin bulkops-producer --bin bulkops-worker
	BULKOPS_BIN_DIR=target/release target/release/bulkops-bench --cluster --individuals $(CLUSTER_N) --runs $(CLUSTER_BENCH_RUNS)
.PHONY: bench-fairness
bench-fairness: ## Fair shares per agency: 4 batches of FAIR_ITEMS=50000 against 1, both policies (FAIR_RUNS=1); writes docs/PERFORMANCE.md's fairness table
	$(CARGO) build --release --locked -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-tests --bin bulkops-bench --bin bulkops-producer --bin bulkops-worker
	BULKOPS_BIN_DIR=target/release target/release/bulkops-bench --fairness --fair-items $${FAIR_ITEMS:-50000} --runs $${FAIR_RUNS:-1}

LOAD_SECS ?= 60
LOAD_CLIENTS ?= 50,200

.PHONY: load
load: ## HTTP load: a realistic request mix for LOAD_SECS=60 s at LOAD_CLIENTS=50,200 concurrent clients; writes docs/PERFORMANCE.md's load table
	$(CARGO) build --release --locked -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-tests --bin bulkops-load --bin bulkops-producer --bin bulkops-worker
	BULKOPS_BIN_DIR=target/release target/release/bulkops-load --secs $(LOAD_SECS) --clients $(LOAD_CLIENTS)

.PHONY: demo
demo: release ## Seed a demo agency, run a producer and two workers, bulk create, convert, show progress
	bash scripts/demo.sh
