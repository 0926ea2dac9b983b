"""`make bench-lora-1b`: LoRA finetuning of a Llama-3.2-1B-shaped model
(random f32 weights) on this machine, with its peak RSS and tokens/s.

Writes the model as a Hugging Face folder (config.json, model.safetensors,
and SmolLM2's tokenizer, whose ids all fit the 128,256-token vocabulary)
under .cache/bench-torch/llama-1b, then runs `posttrain run lora1b`: a
`load` stage and an `sft` with `lora = { r = 16, alpha = 32 }` on q, k, v, o,
batch 2, max_len 128, 3 steps, under /usr/bin/time. Needs `make
bench-torch` to have run once (its venv, its project folder and SmolLM2).
"""

import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, ".cache", "bench-torch")
BIN = os.path.join(ROOT, "target", "release", "posttrain")
MODEL = os.path.join(WORK, "llama-1b")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "float32",
}


def write_model():
    if os.path.exists(os.path.join(MODEL, "model.safetensors")):
        return
    os.makedirs(MODEL, exist_ok=True)
    rng = np.random.default_rng(0)
    c = CONFIG
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def w(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(c["vocab_size"], h), "model.norm.weight": np.ones(h, np.float32)}
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        tensors[p + "self_attn.q_proj.weight"] = w(q, h)
        tensors[p + "self_attn.k_proj.weight"] = w(kv, h)
        tensors[p + "self_attn.v_proj.weight"] = w(kv, h)
        tensors[p + "self_attn.o_proj.weight"] = w(h, q)
        tensors[p + "mlp.gate_proj.weight"] = w(i, h)
        tensors[p + "mlp.up_proj.weight"] = w(i, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, i)
        tensors[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        tensors[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    save_file(tensors, os.path.join(MODEL, "model.safetensors"))
    json.dump(CONFIG, open(os.path.join(MODEL, "config.json"), "w"), indent=1)
    smol = os.path.join(WORK, "results", "smol", "stages", "base")
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        if os.path.exists(os.path.join(smol, f)):
            shutil.copy(os.path.join(smol, f), MODEL)
    n = sum(t.size for t in tensors.values())
    print(f"wrote {MODEL}: {n / 1e9:.2f} B parameters")


def main():
    if not os.path.exists(os.path.join(WORK, "results", "smol", "stages", "base")):
        sys.exit("run `make bench-torch` first (its SmolLM2 stage gives the tokenizer)")
    write_model()
    exp = """
[experiment]
name = "lora1b"
seed = 0
[stages.base]
kind = "load"
path = "llama-1b"
[stages.sft]
kind = "sft"
from = "base"
data = "data/long_sft.parquet"
max_len = 128
lora = { r = 16, alpha = 32, target = ["q_proj", "k_proj", "v_proj", "o_proj"] }
train = { steps = 3, batch_size = 2, lr = 1e-4, warmup_steps = 0 }
"""
    open(os.path.join(WORK, "experiments", "lora1b.toml"), "w").write(exp)
    store = ["--store", os.path.join(WORK, "store"), "--quiet"]
    for stage in ["base", "sft"]:
        stats = os.path.join(WORK, "time-lora.txt")
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", stats, BIN] + store + ["run", "lora1b", "--until", stage, "--force", stage]
        p = subprocess.run(cmd, cwd=WORK, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr[-3000:])
        rss_kb, secs = open(stats).read().split()[-2:]
        print(f"{stage}: {float(secs):.0f} s, peak RSS {int(rss_kb) / 1024 / 1024:.1f} GiB")
    t = pq.read_table(os.path.join(WORK, "results", "lora1b", "stages", "sft", "metrics.parquet"))
    rates = t.column("tokens_per_s").to_pylist()
    print(f"sft tokens/s per step: {[round(r, 1) for r in rates]} (median {statistics.median(rates):.1f})")


if __name__ == "__main__":
    main()
