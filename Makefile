# posttrain: `make run EXP=NAME` runs experiments/NAME.toml; `make test` runs the tests.
EXP ?= llama-dpo
EXPS ?= $(EXP)
CARGO ?= cargo
BIN := target/release/posttrain

.PHONY: build run plan status dag list compare gc test bench fmt lint clean

build:
	$(CARGO) build --release

run: build
	$(BIN) run $(EXP)

plan: build
	$(BIN) plan $(EXP)

status: plan

dag: build
	$(BIN) dag $(EXP)

list: build
	$(BIN) list

compare: build
	$(BIN) compare $(EXPS)

gc: build
	$(BIN) gc

test:
	$(CARGO) test --release

bench:
	$(CARGO) bench

fmt:
	$(CARGO) fmt

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings
