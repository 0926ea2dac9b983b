"""An independent Hugging Face Llama forward pass in plain numpy (float64).

Written from the HF modeling_llama definitions (RMSNorm, rotary embeddings
with rotate_half over the two halves of each head, grouped-query attention
by repeating key/value heads, SwiGLU MLP), not from posttrain's code. Reads a
model folder (config.json + model.safetensors, parsed by hand) and token id
sequences, and writes each sequence's logits and next-token log-probs.

usage: python3 llama_reference.py MODEL_DIR IDS_JSON OUT_JSON
"""
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": "<f4", "F64": "<f8"}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]])
        tensors[name] = arr.reshape(info["shape"]).astype(np.float64)
    return tensors


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def forward(cfg, w, ids):
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = h // nh
    eps, theta = cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    s = len(ids)
    x = w["model.embed_tokens.weight"][ids]  # (S, H)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    freqs = np.outer(np.arange(s), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (S, hd)
    cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
    causal = np.triu(np.full((s, s), -np.inf), k=1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (y @ w[p + "self_attn.q_proj.weight"].T).reshape(s, nh, hd)
        k = (y @ w[p + "self_attn.k_proj.weight"].T).reshape(s, nkv, hd)
        v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(s, nkv, hd)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=1)  # kv head i serves query heads i*g .. i*g+g-1
        v = np.repeat(v, nh // nkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(s, nh * hd)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = y @ w[p + "mlp.gate_proj.weight"].T
        up = y @ w[p + "mlp.up_proj.weight"].T
        silu = gate / (1.0 + np.exp(-gate))
        x = x + (silu * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    logits = x @ head.T
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    token_logp = [float(logp[t, ids[t + 1]]) for t in range(s - 1)]
    return logits, token_logp


def main():
    model_dir, ids_path, out_path = sys.argv[1:4]
    with open(f"{model_dir}/config.json") as f:
        cfg = json.load(f)
    weights = read_safetensors(f"{model_dir}/model.safetensors")
    with open(ids_path) as f:
        sequences = json.load(f)
    out = []
    for ids in sequences:
        logits, token_logp = forward(cfg, weights, ids)
        out.append({"logits": logits.tolist(), "logprobs": token_logp})
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
