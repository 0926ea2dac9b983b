"""An independent Hugging Face decoder forward pass in plain numpy (float64).

Written from the transformers definitions (not from posttrain's code) of
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM:
RMSNorm, rotary embeddings with rotate_half over the two halves of each head
(rope types default, linear and llama3), grouped-query attention by repeating
key/value heads, optional q/k/v/o and MLP biases, Qwen3's per-head q/k RMSNorm
before rope, SwiGLU MLP, tied or untied head. Reads a model folder
(config.json + model.safetensors or a sharded model.safetensors.index.json,
F32/F64, parsed by hand) and token id sequences, and writes each sequence's
logits and next-token log-probs. Anything it does not implement (another
architecture or rope type, an active sliding window, bf16 weights, a missing
or unexpected tensor, ...) is an error: non-zero exit and a message.

usage: python3 llama_reference.py MODEL_DIR IDS_JSON OUT_JSON [--logprobs-only]

The output is a JSON list, one {"logits": [[...] per position], "logprobs":
[log p(ids[t+1] | ids[..t]) for t < len-1]} per sequence; --logprobs-only
writes "logits": null (for big vocabularies).

How config.json is read (transformers 4.4x and 5.x agree on these points):
  * model_type (or architectures[0]) picks llama / mistral / qwen2 / qwen3;
    when both are given they must agree.
  * rope: v5 `rope_parameters` {rope_type, rope_theta, factor, ...} or v4
    top-level `rope_theta` + optional `rope_scaling` {rope_type | legacy type,
    factor, ...}. As transformers 5 does: a non-empty rope_scaling replaces
    rope_parameters; rope_theta inside the dict wins over the top-level one;
    theta defaults to 10000; rope_type defaults to `type`, then "default";
    llama3's original_max_position_embeddings defaults to a top-level
    original_max_position_embeddings, then max_position_embeddings (4.x
    required it in the dict). The cos/sin attention_factor is 1.0 for all three
    supported types (transformers' _compute_{default,linear_scaling,llama3}
    never set it).
  * head_dim: explicit `head_dim`, else hidden_size // num_attention_heads;
    Qwen3's default is 128 when the key is absent.
  * num_key_value_heads defaults: llama = num_attention_heads, mistral = 8,
    qwen2/qwen3 = 32 (the config classes' defaults); null = num_attention_heads.
  * biases: llama `attention_bias` (q/k/v/o) and `mlp_bias` (gate/up/down);
    qwen2 always q/k/v, never o or MLP; qwen3 `attention_bias` (q/k/v/o);
    mistral none.
  * sliding window: mistral `sliding_window` (default 4096 when absent) on
    every layer; qwen2/qwen3 only with `use_sliding_window`, on the layers
    that `layer_types` (default: index >= max_window_layers, 28) marks
    sliding. A window W masks nothing when len <= W; a longer sequence is an
    error here.
  * rms_norm_eps default 1e-6, tie_word_embeddings default false,
    hidden_act must be silu.
"""
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": "<f4", "F64": "<f8"}

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class RefError(Exception):
    pass


def fail(msg):
    raise RefError(msg)


# ---------------------------------------------------------------- safetensors

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
        if info["dtype"] not in DTYPES:
            fail(f"{path}: tensor {name} has dtype {info['dtype']}; only F32 and F64 are supported")
        start, end = info["data_offsets"]
        arr = np.frombuffer(body[start:end], dtype=DTYPES[info["dtype"]])
        tensors[name] = arr.reshape(info["shape"]).astype(np.float64)
    return tensors


def read_model_weights(model_dir):
    single = os.path.join(model_dir, "model.safetensors")
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return read_safetensors(single)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_safetensors(os.path.join(model_dir, shard)))
        return tensors
    fail(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


# ---------------------------------------------------------------- rope

def default_inv_freq(theta, head_dim):
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, old_context_len):
    """transformers' _compute_llama3_parameters, term for term."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    # wavelengths longer than low_freq_wavelen: divided by factor; shorter
    # than high_freq_wavelen: kept; between: interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


ROPE_KEYS = {
    "default": {"rope_type", "type", "rope_theta"},
    "linear": {"rope_type", "type", "rope_theta", "factor"},
    "llama3": {"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings"},
}


def rope_parameters(cfg):
    """The standardized rope dict transformers 5 builds from config.json
    (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict +
    standardize_rope_params), cross-checked against how 4.x reads v4 files."""
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        fail(f"rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        fail(f"rope_scaling must be an object or null, got {scaling!r}")
    rope = dict(scaling or params or {})
    if any(isinstance(v, dict) for v in rope.values()):
        fail("per-layer-type (nested) rope parameters are not supported")
    top_theta = cfg.get("rope_theta")
    rope.setdefault("rope_theta", top_theta if top_theta is not None else 10000.0)
    if rope["rope_theta"] is None:
        fail("rope_theta is null")
    if "type" in rope and "rope_type" in rope and rope["type"] != rope["rope_type"]:
        fail(f"rope dict has type={rope['type']!r} and rope_type={rope['rope_type']!r}: "
             "transformers 4 reads the first, 5 the second")
    if scaling and top_theta is not None and rope["rope_theta"] != top_theta:
        fail(f"rope_scaling.rope_theta={rope['rope_theta']} differs from rope_theta={top_theta}: "
             "transformers 4 reads the top-level one, 5 the dict's")
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope_type = rope["rope_type"]
    if rope_type not in ROPE_KEYS:
        fail(f"rope_type {rope_type!r} is not supported (only default, linear, llama3)")
    if rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        fail("partial_rotary_factor != 1 is not supported")
    if rope_type == "llama3":
        if "original_max_position_embeddings" in cfg:
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        elif "original_max_position_embeddings" not in rope:
            rope["original_max_position_embeddings"] = cfg["max_position_embeddings"]
    unknown = set(rope) - ROPE_KEYS[rope_type] - {"partial_rotary_factor"}
    if unknown:
        # transformers only warns ("Unrecognized keys") and ignores them.
        print(f"llama_reference: ignoring rope keys {sorted(unknown)} for rope_type {rope_type}",
              file=sys.stderr)
    return rope


def rope_inv_freq(rope, head_dim):
    """(inv_freq over head_dim/2 frequencies, attention_factor)."""
    rope_type = rope["rope_type"]
    inv_freq = default_inv_freq(float(rope["rope_theta"]), head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, float(rope["factor"]), float(rope["low_freq_factor"]),
                                   float(rope["high_freq_factor"]),
                                   float(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        fail(f"rope_type {rope_type!r} is not supported")
    # default, linear and llama3 all return attention_factor = 1.0.
    return inv_freq, 1.0


# ---------------------------------------------------------------- config

def model_spec(cfg):
    """Everything the forward pass needs, from an HF config.json dict."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type is None:
        by_class = {v: k for k, v in ARCHITECTURES.items()}
        if not archs or archs[0] not in by_class:
            fail(f"config has no model_type and architectures={archs!r} is not supported")
        model_type = by_class[archs[0]]
    if model_type not in ARCHITECTURES:
        fail(f"model_type {model_type!r} is not supported (llama, mistral, qwen2, qwen3)")
    if archs and archs[0] != ARCHITECTURES[model_type]:
        fail(f"architectures[0]={archs[0]!r} does not match model_type {model_type!r}")
    if len(archs) > 1:
        fail(f"several architectures: {archs!r}")

    def req(key):
        if cfg.get(key) is None:
            fail(f"config.json lacks {key}")
        return cfg[key]

    hidden, n_heads, n_layers = req("hidden_size"), req("num_attention_heads"), req("num_hidden_layers")
    kv_default = {"llama": None, "mistral": 8, "qwen2": 32, "qwen3": 32}[model_type]
    n_kv = cfg.get("num_key_value_heads", kv_default)
    if n_kv is None:
        n_kv = n_heads
    if n_heads % n_kv:
        fail(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if model_type == "qwen3":
        head_dim = cfg.get("head_dim", 128)
        if head_dim is None:
            fail("qwen3 config has head_dim null (transformers would fail)")
    else:
        head_dim = cfg.get("head_dim") or hidden // n_heads
    if head_dim % 2:
        fail(f"head_dim {head_dim} is odd")
    if cfg.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        print("llama_reference: pretraining_tp > 1 changes nothing in the math", file=sys.stderr)

    attention_bias = bool(cfg.get("attention_bias", False))
    if model_type == "llama":
        attn_biases = {"q_proj", "k_proj", "v_proj", "o_proj"} if attention_bias else set()
        mlp_biases = {"gate_proj", "up_proj", "down_proj"} if cfg.get("mlp_bias", False) else set()
    elif model_type == "mistral":
        attn_biases, mlp_biases = set(), set()
    elif model_type == "qwen2":
        attn_biases, mlp_biases = {"q_proj", "k_proj", "v_proj"}, set()
    else:  # qwen3
        attn_biases = {"q_proj", "k_proj", "v_proj", "o_proj"} if attention_bias else set()
        mlp_biases = set()

    # Sliding windows, layer by layer (None: full causal attention).
    if model_type == "mistral":
        window = cfg.get("sliding_window", 4096)
        windows = [window] * n_layers
    elif model_type in ("qwen2", "qwen3"):
        window = cfg.get("sliding_window", 4096) if cfg.get("use_sliding_window", False) else None
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            mwl = cfg.get("max_window_layers", 28)
            layer_types = ["sliding_attention" if window is not None and i >= mwl else "full_attention"
                           for i in range(n_layers)]
        if len(layer_types) != n_layers or set(layer_types) - {"sliding_attention", "full_attention"}:
            fail(f"layer_types {layer_types!r} not understood")
        windows = [window if t == "sliding_attention" else None for t in layer_types]
    else:
        windows = [None] * n_layers

    rope = rope_parameters(cfg)
    inv_freq, attention_factor = rope_inv_freq(rope, head_dim)
    return {
        "model_type": model_type,
        "hidden_size": hidden,
        "num_layers": n_layers,
        "num_heads": n_heads,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": req("intermediate_size"),
        "vocab_size": req("vocab_size"),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "inv_freq": inv_freq,
        "attention_factor": attention_factor,
        "attn_biases": attn_biases,
        "mlp_biases": mlp_biases,
        "qk_norm": model_type == "qwen3",
        "sliding_windows": windows,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def expected_shapes(spec):
    h, nh, nkv, hd = spec["hidden_size"], spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    inter, vocab = spec["intermediate_size"], spec["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not spec["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, h)
    proj = {"q_proj": (nh * hd, h), "k_proj": (nkv * hd, h), "v_proj": (nkv * hd, h),
            "o_proj": (h, nh * hd), "gate_proj": (inter, h), "up_proj": (inter, h),
            "down_proj": (h, inter)}
    for i in range(spec["num_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, shape in proj.items():
            mod = "self_attn." if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp."
            shapes[p + mod + name + ".weight"] = shape
            if name in spec["attn_biases"] | spec["mlp_biases"]:
                shapes[p + mod + name + ".bias"] = (shape[0],)
        if spec["qk_norm"]:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes


def check_weights(spec, w):
    """The tensors are exactly the ones the architecture has, with their shapes."""
    w = dict(w)
    for name in [n for n in w if n.endswith("rotary_emb.inv_freq")]:
        del w[name]  # old checkpoints saved the buffer; transformers ignores it
    if spec["tie_word_embeddings"] and "lm_head.weight" in w:
        if not np.array_equal(w["lm_head.weight"], w["model.embed_tokens.weight"]):
            fail("tie_word_embeddings is true but lm_head.weight differs from the embedding")
        del w["lm_head.weight"]
    shapes = expected_shapes(spec)
    missing = sorted(set(shapes) - set(w))
    extra = sorted(set(w) - set(shapes))
    if missing or extra:
        fail(f"tensor set mismatch for {spec['model_type']}: missing {missing[:8]}"
             f"{' ...' if len(missing) > 8 else ''}, unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    for name, shape in shapes.items():
        if tuple(w[name].shape) != shape:
            fail(f"{name} has shape {tuple(w[name].shape)}, expected {shape}")
    return w


# ---------------------------------------------------------------- forward

def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def linear(x, w, name):
    y = x @ w[name + ".weight"].T
    bias = w.get(name + ".bias")
    return y if bias is None else y + bias


def forward(spec, w, ids):
    """Logits (S, V) and the S-1 next-token log-probs of one sequence."""
    h, nh, nkv, hd = spec["hidden_size"], spec["num_heads"], spec["num_kv_heads"], spec["head_dim"]
    eps = spec["rms_norm_eps"]
    s = len(ids)
    if s == 0:
        fail("empty sequence")
    if min(ids) < 0 or max(ids) >= spec["vocab_size"]:
        fail(f"token id out of range [0, {spec['vocab_size']})")
    for layer, window in enumerate(spec["sliding_windows"]):
        if window is not None and window < s:
            fail(f"layer {layer} has sliding_window {window} < sequence length {s}: not implemented")
    x = w["model.embed_tokens.weight"][ids]  # (S, H)
    freqs = np.outer(np.arange(s, dtype=np.float64), spec["inv_freq"])
    emb = np.concatenate([freqs, freqs], axis=-1)  # (S, hd)
    cos = (np.cos(emb) * spec["attention_factor"])[:, None, :]
    sin = (np.sin(emb) * spec["attention_factor"])[:, None, :]
    causal = np.triu(np.full((s, s), -np.inf), k=1)
    for layer in range(spec["num_layers"]):
        p = f"model.layers.{layer}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = linear(y, w, p + "self_attn.q_proj").reshape(s, nh, hd)
        k = linear(y, w, p + "self_attn.k_proj").reshape(s, nkv, hd)
        v = linear(y, w, p + "self_attn.v_proj").reshape(s, nkv, hd)
        if spec["qk_norm"]:  # Qwen3: RMSNorm over each head's head_dim, before rope
            q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = np.repeat(k, nh // nkv, axis=1)  # kv head i serves query heads i*g .. i*g+g-1
        v = np.repeat(v, nh // nkv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", probs, v).reshape(s, nh * hd)
        x = x + linear(out, w, p + "self_attn.o_proj")
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = linear(y, w, p + "mlp.gate_proj")
        up = linear(y, w, p + "mlp.up_proj")
        silu = gate / (1.0 + np.exp(-gate))
        x = x + linear(silu * up, w, p + "mlp.down_proj")
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if spec["tie_word_embeddings"] else w["lm_head.weight"]
    logits = x @ head.T
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    token_logp = [float(logp[t, ids[t + 1]]) for t in range(s - 1)]
    return logits, token_logp


def run(spec, weights, argv_rest, prog):
    """Shared CLI tail: IDS_JSON OUT_JSON [--logprobs-only]."""
    flags = [a for a in argv_rest if a.startswith("--")]
    args = [a for a in argv_rest if not a.startswith("--")]
    if len(args) != 2 or set(flags) - {"--logprobs-only"}:
        fail(f"usage: python3 {prog} MODEL IDS_JSON OUT_JSON [--logprobs-only]")
    ids_path, out_path = args
    weights = check_weights(spec, weights)
    with open(ids_path) as f:
        sequences = json.load(f)
    if not isinstance(sequences, list) or not all(isinstance(s, list) for s in sequences):
        fail("IDS_JSON must be a list of lists of token ids")
    out = []
    for ids in sequences:
        logits, token_logp = forward(spec, weights, [int(t) for t in ids])
        out.append({"logits": None if flags else logits.tolist(), "logprobs": token_logp})
    with open(out_path, "w") as f:
        json.dump(out, f)


def main(argv):
    if len(argv) < 2:
        fail("usage: python3 llama_reference.py MODEL_DIR IDS_JSON OUT_JSON [--logprobs-only]")
    model_dir = argv[1]
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    spec = model_spec(cfg)
    run(spec, read_model_weights(model_dir), argv[2:], "llama_reference.py")


if __name__ == "__main__":
    try:
        main(sys.argv)
    except RefError as e:
        print(f"llama_reference: error: {e}", file=sys.stderr)
        sys.exit(2)
