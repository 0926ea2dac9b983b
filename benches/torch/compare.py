"""`make bench-torch`: posttrain against PyTorch 2 eager, side by side in one
run on this machine (2 threads each), one process per measurement so each
has its own peak RSS.

- Training: posttrain's `pretrain` stage against transformers'
  LlamaForCausalLM at the same shapes (vocabulary 512, AdamW, clip 1.0);
  SmolLM2-135M SFT and DPO steps at sequence 256. Median step after two
  warm-up steps.
- Generation: `posttrain sample` against transformers' `generate` on
  SmolLM2-135M, greedy with a KV cache, 48 new tokens, batch 1 and 16.

Writes results/bench-torch/bench.json and bench.md (the table README shows)
and prints the table. Run through `make bench-torch`, which makes the venv
with torch and transformers (.cache/bench-venv) first; never part of CI.
Settings: BENCH_QUICK=1 runs only the two smallest shapes and batch-1
generation (for checking the bench itself); BENCH_PARTS=shapes,smol,generate
(the default) picks the parts, and `memory` adds the peak RSS of every
training stage kind on SmolLM2 (results/bench-torch/memory.md);
BENCH_REPEATS=N (default 2) measures each case N times, the two sides
taking turns, and keeps each side's best tokens/s and highest peak RSS (the
machine's speed drifts between runs by more than the differences measured).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "posttrain")
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
WORK = os.path.join(ROOT, ".cache", "bench-torch")
OUT = os.path.join(ROOT, "results", "bench-torch")
QUICK = os.environ.get("BENCH_QUICK") == "1"
PARTS = os.environ.get("BENCH_PARTS", "shapes,smol,generate").split(",")
REPEATS = max(1, int(os.environ.get("BENCH_REPEATS", "2")))
WARMUP = 2

# (name, hidden, layers, heads, kv heads, intermediate, seq, batch, steps)
SHAPES = [
    ("hidden 64 x 2 layers", 64, 2, 4, 2, 176, 64, 16, 14),
    ("hidden 160 x 4", 160, 4, 4, 2, 432, 64, 16, 12),
    ("hidden 256 x 4, 8 heads", 256, 4, 8, 4, 688, 128, 8, 10),
    ("hidden 512 x 8, 8 heads", 512, 8, 8, 4, 1376, 128, 8, 6),
]
SMOL_SEQ = 256
SMOL_SFT_BATCH = 2
SMOL_DPO_PAIRS = 1
SMOL_STEPS = 5
NEW_TOKENS = 48

PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Name three primary colors.",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What does a compiler do?",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is photosynthesis?",
    "Translate 'good morning' into Spanish.",
    "List two benefits of regular exercise.",
    "What is 12 times 7?",
]


def run(cmd, env=None, cwd=None):
    """Run a command to its end; (stdout, stderr), or stop the bench on failure."""
    p = subprocess.run(
        cmd, capture_output=True, cwd=cwd, env={**os.environ, **(env or {})}, text=True
    )
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout, p.stderr


def measured(cmd, env=None, cwd=None):
    """Run a command under GNU time: (stdout, stderr, peak RSS MB)."""
    stats = os.path.join(WORK, "time.txt")
    out, err = run(["/usr/bin/time", "-f", "%M", "-o", stats] + cmd, env, cwd)
    with open(stats) as f:
        rss_mb = int(f.read().split()[-1]) / 1024
    return out, err, rss_mb


def torch_side(args):
    py = os.path.join(ROOT, ".cache", "bench-venv", "bin", "python")
    script = os.path.join(ROOT, "benches", "torch", "torch_side.py")
    out, _, rss = measured([py, script] + [str(a) for a in args])
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_mb"] = rss
    return result


def write_project():
    if os.path.exists(WORK):
        shutil.rmtree(WORK)
    os.makedirs(os.path.join(WORK, "experiments"))
    os.makedirs(os.path.join(WORK, "data"))
    os.makedirs(os.path.join(WORK, "models"))
    os.symlink(GGUF, os.path.join(WORK, "models", os.path.basename(GGUF)))
    # Long responses, so every row is cut at max_len = SMOL_SEQ tokens.
    words = (
        "the model reads every token of this long answer so that the sequence "
        "reaches the length the benchmark asks for and no row is shorter than "
        "another one in the batch while it trains on these words again "
    ).split()
    text = lambda k: " ".join(words[(i * 7 + k) % len(words)] for i in range(400))
    n = 16
    prompts = [f"Question {i}: tell me a long story." for i in range(n)]
    pq.write_table(
        pa.table({"prompt": prompts, "completion": [text(i) for i in range(n)]}),
        os.path.join(WORK, "data", "long_sft.parquet"),
    )
    pq.write_table(
        pa.table(
            {
                "prompt": prompts,
                "chosen": [text(i) for i in range(n)],
                "rejected": [text(i + 3) for i in range(n)],
            }
        ),
        os.path.join(WORK, "data", "long_pairs.parquet"),
    )
    smol = smol_experiment("smol") + f"""
[stages.sft]
kind = "sft"
from = "base"
data = "data/long_sft.parquet"
max_len = {SMOL_SEQ}
train = {{ steps = {SMOL_STEPS}, batch_size = {SMOL_SFT_BATCH}, lr = 2e-5, warmup_steps = 0 }}
[stages.dpo]
kind = "dpo"
from = "base"
data = "data/long_pairs.parquet"
max_len = {SMOL_SEQ}
train = {{ steps = {SMOL_STEPS}, batch_size = {SMOL_DPO_PAIRS}, lr = 5e-6, warmup_steps = 0 }}
"""
    open(os.path.join(WORK, "experiments", "smol.toml"), "w").write(smol)
    open(os.path.join(WORK, "experiments", "memory.toml"), "w").write(memory_experiment())
    for i, (_, h, l, nh, kv, inter, seq, batch, steps) in enumerate(SHAPES):
        exp = f"""
[experiment]
name = "shape{i}"
seed = 0
[stages.world]
kind = "synth"
[stages.tokenizer]
kind = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
vocab_size = 512
[stages.pretrain]
kind = "pretrain"
tokenizer = "tokenizer"
corpus = {{ stage = "world", file = "corpus.parquet" }}
seq_len = {seq}
model = {{ hidden_size = {h}, num_hidden_layers = {l}, num_attention_heads = {nh}, num_key_value_heads = {kv}, intermediate_size = {inter} }}
train = {{ steps = {steps}, batch_size = {batch}, lr = 1e-3, warmup_steps = 0 }}
"""
        open(os.path.join(WORK, "experiments", f"shape{i}.toml"), "w").write(exp)


def smol_experiment(name):
    """An experiment's header and its `base` stage: SmolLM2 from its GGUF file."""
    return f"""
[experiment]
name = "{name}"
seed = 0
[stages.base]
kind = "load"
path = "models/{os.path.basename(GGUF)}"
"""


# (stage, kind, what it holds, upstream stages) for the memory part.
UPSTREAM = ["world", "base"]
MEMORY_STAGES = [
    ("sft", "sft", "policy + AdamW", UPSTREAM),
    ("rm", "reward", "reward model (policy + scalar head) + AdamW", UPSTREAM),
    ("dpo", "dpo", "policy + AdamW; reference log-probs computed before training", UPSTREAM),
    ("kto", "kto", "policy + AdamW; reference log-probs computed before training", UPSTREAM),
    ("orpo", "orpo", "policy + AdamW, no reference", UPSTREAM),
    ("grpo", "grpo", "policy + AdamW + frozen reference; 2 prompts x 4 samples of 32 tokens", UPSTREAM),
    ("ppo", "ppo", "policy + value model, each with AdamW, + frozen reference and reward model; 4 prompts x 32 tokens", UPSTREAM + ["rm"]),
]
# The stages above that train on the comparisons (the same settings each).
PAIR_STAGES = ["rm", "dpo", "kto", "orpo"]
MEMORY_ROWS = 16
MEMORY_LEN = 128


def memory_experiment():
    """SmolLM2 under every training stage kind: 3 steps of batch 4 (GRPO 2
    prompts), sequences up to 128 tokens, on the synthetic world's data."""
    rows = f"max_rows = {MEMORY_ROWS}"
    train = "train = { steps = 3, batch_size = 4, lr = 1e-6, warmup_steps = 0 }"
    pairs = f'data = {{ stage = "world", file = "comparisons.parquet", {rows} }}\nmax_len = {MEMORY_LEN}\n{train}'
    prompts = f'prompts = {{ stage = "world", file = "prompts_train.parquet", {rows} }}\nsampling = {{ max_new_tokens = 32 }}'
    kinds = {stage: kind for stage, kind, _, _ in MEMORY_STAGES}
    pair_stages = "".join(
        f'[stages.{st}]\nkind = "{kinds[st]}"\nfrom = "base"\n{pairs}\n' for st in PAIR_STAGES
    )
    return smol_experiment("memory") + f"""[stages.world]
kind = "synth"
[stages.sft]
kind = "sft"
from = "base"
data = {{ stage = "world", file = "demonstrations.parquet", {rows} }}
max_len = {MEMORY_LEN}
{train}
{pair_stages}[stages.grpo]
kind = "grpo"
from = "base"
gold = "world"
{prompts}
num_generations = 4
train = {{ steps = 3, batch_size = 2, lr = 1e-6, warmup_steps = 0 }}
[stages.ppo]
kind = "ppo"
from = "base"
reward_model = "rm"
{prompts}
{train}
"""


def memory_part():
    """Peak RSS of each stage run alone (its upstream built first)."""
    params = 134515008
    out = []
    for stage, kind, what, upstream in MEMORY_STAGES:
        for up in upstream:
            posttrain(["run", "memory", "--until", up])
        _, _, rss = posttrain(["run", "memory", "--until", stage, "--force", stage])
        out.append({"stage": kind, "holds": what, "rss_mb": rss, "bytes_per_param": rss * 2**20 / params})
        print(json.dumps(out[-1]), flush=True)
    lines = ["| stage kind | what it holds | peak RSS | bytes / parameter |", "|---|---|---|---|"]
    for r in out:
        lines.append(f"| `{r['stage']}` | {r['holds']} | {r['rss_mb']:,.0f} MiB | {r['bytes_per_param']:.1f} |")
    return out, "\n".join(lines)


def best_of(runs):
    """One side's repeated measurements: the best tokens/s, the highest RSS."""
    best = max(runs, key=lambda r: r["tokens_per_s"])
    return {**best, "rss_mb": max(r["rss_mb"] for r in runs), "runs": [r["tokens_per_s"] for r in runs]}


def side_by_side(ours, theirs):
    """Each side REPEATS times, taking turns."""
    a, b = [], []
    for _ in range(REPEATS):
        a.append(ours())
        b.append(theirs())
    return best_of(a), best_of(b)


def posttrain(args, quiet=True):
    flags = ["--quiet"] if quiet else []
    return measured([BIN, "--store", os.path.join(WORK, "store")] + flags + args, cwd=WORK)


def step_stats(exp, stage):
    """Median tokens/s after warm-up from the stage's per-step metrics."""
    t = pq.read_table(os.path.join(WORK, "results", exp, "stages", stage, "metrics.parquet"))
    rates = [r for r in t.column("tokens_per_s").to_pylist() if r is not None]
    return statistics.median(rates[WARMUP:] if len(rates) > WARMUP else rates)


def posttrain_train(exp, stage, upstream):
    # Upstream stages first (not measured), then the stage alone.
    if upstream:
        posttrain(["run", exp, "--until", upstream])
    _, _, rss = posttrain(["run", exp, "--until", stage, "--force", stage])
    return {"tokens_per_s": step_stats(exp, stage), "rss_mb": rss}


def posttrain_generate(prompts):
    args = ["sample", "smol", "base", "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
    for p in prompts:
        args += ["--prompt", p]
    _, err, rss = posttrain(args, quiet=False)
    line = [l for l in err.splitlines() if l.startswith("generated ")][-1]
    rate = float(line.split("(")[1].split()[0])
    return {"tokens_per_s": rate, "rss_mb": rss, "line": line}


def row(name, params, ours, theirs):
    return {
        "case": name,
        "params": params,
        "posttrain_tokens_per_s": ours["tokens_per_s"],
        "pytorch_tokens_per_s": theirs["tokens_per_s"],
        "ratio": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "posttrain_rss_mb": ours["rss_mb"],
        "pytorch_rss_mb": theirs["rss_mb"],
        "rss_ratio": ours["rss_mb"] / theirs["rss_mb"],
        "posttrain_runs": ours.get("runs", []),
        "pytorch_runs": theirs.get("runs", []),
    }


def main():
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} is missing: `make build` first")
    if not os.path.exists(GGUF):
        sys.exit(f"{GGUF} is missing: `make models` first")
    write_project()
    os.makedirs(OUT, exist_ok=True)
    rows = []
    started = time.time()
    shapes = SHAPES[:2] if QUICK else SHAPES
    if "shapes" not in PARTS:
        shapes = []
    for i, (name, h, l, nh, kv, inter, seq, batch, steps) in enumerate(shapes):
        ours, theirs = side_by_side(
            lambda: posttrain_train(f"shape{i}", "pretrain", "tokenizer"),
            lambda: torch_side(
                ["train", "--hidden", h, "--layers", l, "--heads", nh, "--kv", kv, "--inter", inter,
                 "--seq", seq, "--batch", batch, "--steps", steps]
            ),
        )
        label = f"{name}, seq {seq}, batch {batch}"
        rows.append(row(label, theirs["params"], ours, theirs))
        print(json.dumps(rows[-1]), flush=True)
    posttrain(["run", "smol", "--until", "base"])
    if not QUICK and "smol" in PARTS:
        for stage, batch in [("sft", SMOL_SFT_BATCH), ("dpo", SMOL_DPO_PAIRS)]:
            ours, theirs = side_by_side(
                lambda: posttrain_train("smol", stage, None),
                lambda: torch_side(
                    [stage, "--gguf", GGUF, "--seq", SMOL_SEQ, "--batch", batch, "--steps", SMOL_STEPS]
                ),
            )
            what = f"{batch} pair(s)" if stage == "dpo" else f"batch {batch}"
            rows.append(row(f"SmolLM2-135M {stage.upper()}, seq {SMOL_SEQ}, {what}", 134515008, ours, theirs))
            print(json.dumps(rows[-1]), flush=True)
    prompts_file = os.path.join(WORK, "prompts.json")
    for b in [] if "generate" not in PARTS else [1] if QUICK else [1, 16]:
        json.dump(PROMPTS[:b], open(prompts_file, "w"))
        ours, theirs = side_by_side(
            lambda: posttrain_generate(PROMPTS[:b]),
            lambda: torch_side(
                ["generate", "--gguf", GGUF, "--prompts", prompts_file, "--max-new-tokens", NEW_TOKENS]
            ),
        )
        rows.append(row(f"SmolLM2-135M generate, batch {b}, {NEW_TOKENS} new tokens", 134515008, ours, theirs))
        print(json.dumps(rows[-1]), flush=True)

    memory, memory_table = memory_part() if "memory" in PARTS else ([], "")
    if memory:
        open(os.path.join(OUT, "memory.md"), "w").write(memory_table + "\n")
    json.dump(
        {"rows": rows, "memory": memory, "repeats": REPEATS, "seconds": time.time() - started},
        open(os.path.join(OUT, "bench.json"), "w"),
        indent=1,
    )
    if rows:
        write_speed_table(rows)
    if memory_table:
        print(memory_table)
    print(f"({time.time() - started:.0f} s; results/bench-torch/: bench.json and the tables)")


def write_speed_table(rows):
    """bench.parquet and bench.md (the table README shows), printed too."""
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(OUT, "bench.parquet"))
    lines = [
        "| case | params | posttrain tokens/s | PyTorch tokens/s | ratio | posttrain peak RSS | PyTorch peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:.2f} M | {r['posttrain_tokens_per_s']:,.0f} | "
            f"{r['pytorch_tokens_per_s']:,.0f} | {r['ratio']:.2f} | {r['posttrain_rss_mb']:,.0f} MiB | "
            f"{r['pytorch_rss_mb']:,.0f} MiB |"
        )
    table = "\n".join(lines)
    open(os.path.join(OUT, "bench.md"), "w").write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
