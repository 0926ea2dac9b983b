"""The numpy reference forward pass (llama_reference.py) on a GGUF file.

Reads a llama.cpp GGUF checkpoint with the `gguf` python package
(GGUFReader; every tensor dequantized with gguf.quants.dequantize, then
float64), maps its metadata and tensor names to the Hugging Face layout and
runs llama_reference.forward. Architectures: llama (which llama.cpp also uses
for Mistral), qwen2, qwen3.

usage: python3 gguf_reference.py MODEL.gguf IDS_JSON OUT_JSON [--logprobs-only]

Same output as llama_reference.py. Mapping:
  metadata {arch}.block_count, embedding_length, feed_forward_length,
    attention.head_count, attention.head_count_kv (default head_count),
    attention.layer_norm_rms_epsilon, rope.freq_base (default 10000),
    attention.key_length / value_length (head_dim; default embedding_length /
    head_count, for qwen3 the size of attn_q_norm), rope.dimension_count (must
    equal head_dim), rope.scaling.type none|linear with rope.scaling.factor,
    vocab_size (default: the embedding's rows). Any other {arch}.* key that
    could change the math (yarn, attention.scale, sliding_window, experts,
    per-layer head counts, ...) is an error.
  tensors token_embd -> model.embed_tokens, output_norm -> model.norm,
    output -> lm_head (absent: tied), blk.N.attn_norm / ffn_norm ->
    input_layernorm / post_attention_layernorm, attn_q/k/v/output -> q/k/v/o_proj,
    ffn_gate/up/down -> gate/up/down_proj (.weight and, where present, .bias),
    attn_q_norm / attn_k_norm -> q_norm / k_norm (qwen3), rope_freqs (llama3
    rope as llama.cpp stores it: inv_freq is divided by it).
  The llama architecture's converter (convert_hf_to_gguf LlamaModel,
    undo_permute) reorders the rows of q_proj and k_proj (weight and bias)
    within each head from HF's [first half | second half] to llama.cpp's
    interleaved pairs; that is undone here (q with head_count heads, k with
    head_count_kv). Qwen2Model / Qwen3Model do not permute (llama.cpp uses
    NEOX rope for them), so nothing is undone for qwen2/qwen3.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_reference as ref  # noqa: E402

try:
    import gguf
except ImportError:  # pragma: no cover
    print("gguf_reference: error: the gguf python package is required (pip install gguf)",
          file=sys.stderr)
    sys.exit(2)

fail = ref.fail

# {arch}.* keys read below, and the ones that cannot change the forward pass.
READ_KEYS = {
    "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base",
    "attention.key_length", "attention.value_length", "rope.dimension_count",
    "rope.scaling.type", "rope.scaling.factor", "vocab_size",
}
HARMLESS_KEYS = {"context_length", "rope.scaling.original_context_length", "rope.scaling.finetuned"}

PROJ = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj"}
LAYER = {"attn_norm.weight": "input_layernorm.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight",
         "attn_q_norm.weight": "self_attn.q_norm.weight",
         "attn_k_norm.weight": "self_attn.k_norm.weight"}
for _g, _h in PROJ.items():
    LAYER[_g + ".weight"] = _h + ".weight"
    LAYER[_g + ".bias"] = _h + ".bias"
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def unpermute_rows(w, n_head):
    """Undo llama.cpp's LlamaModel.permute: within each head of d rows, GGUF
    row 2j is HF row j and GGUF row 2j+1 is HF row j + d/2."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        fail(f"cannot un-permute {rows} rows over {n_head} heads")
    d = rows // n_head
    pairs = w.reshape(n_head, d // 2, 2, *w.shape[1:])
    return np.swapaxes(pairs, 1, 2).reshape(w.shape)


def scalar(v, key):
    if isinstance(v, (list, tuple, np.ndarray)):
        fail(f"{key} is an array ({list(v)[:8]}...): per-layer values are not supported")
    return v


def read(path):
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        fail(f"general.architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    prefix = arch + "."
    keys = {k[len(prefix):]: v for k, v in meta.items() if k.startswith(prefix)}
    unknown = sorted(set(keys) - READ_KEYS - HARMLESS_KEYS)
    if unknown:
        fail(f"unsupported metadata: {[prefix + k for k in unknown]}")

    def key(name, default=None, required=False):
        if name not in keys:
            if required:
                fail(f"metadata lacks {prefix}{name}")
            return default
        return scalar(keys[name], prefix + name)

    weights = {}
    for t in reader.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in LAYER:
                fail(f"unknown tensor {t.name}")
            name = f"model.layers.{int(layer)}.{LAYER[rest]}"
        elif t.name in GLOBAL:
            name = GLOBAL[t.name]
        elif t.name == "rope_freqs.weight":
            name = "rope_freqs"
        else:
            fail(f"unknown tensor {t.name}")
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (columns) first
        data = np.asarray(data, dtype=np.float64).reshape(expected)
        weights[name] = data

    n_layers = int(key("block_count", required=True))
    hidden = int(key("embedding_length", required=True))
    n_heads = int(key("attention.head_count", required=True))
    n_kv = int(key("attention.head_count_kv", n_heads))
    head_dim = key("attention.key_length")
    if head_dim is None:
        qn = weights.get("model.layers.0.self_attn.q_norm.weight")
        head_dim = qn.shape[0] if qn is not None else hidden // n_heads
    head_dim = int(head_dim)
    if int(key("attention.value_length", head_dim)) != head_dim:
        fail("attention.value_length differs from key_length")
    if int(key("rope.dimension_count", head_dim)) != head_dim:
        fail(f"rope.dimension_count {key('rope.dimension_count')} != head_dim {head_dim}: "
             "partial rotary is not supported")
    if n_heads % n_kv:
        fail(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    vocab = int(key("vocab_size", weights["model.embed_tokens.weight"].shape[0]))

    theta = float(key("rope.freq_base", 10000.0))
    inv_freq = ref.default_inv_freq(theta, head_dim)
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        inv_freq = inv_freq / float(key("rope.scaling.factor", required=True))
    elif scaling != "none":
        fail(f"rope.scaling.type {scaling!r} is not supported (none, linear)")
    rope_freqs = weights.pop("rope_freqs", None)
    if rope_freqs is not None:
        if arch != "llama" or rope_freqs.shape != (head_dim // 2,):
            fail(f"rope_freqs of shape {rope_freqs.shape} for {arch} not understood")
        inv_freq = inv_freq / rope_freqs  # llama.cpp: theta_i / freq_factor_i

    if arch == "llama":
        for i in range(n_layers):
            for proj, heads in (("q_proj", n_heads), ("k_proj", n_kv)):
                for kind in ("weight", "bias"):
                    name = f"model.layers.{i}.self_attn.{proj}.{kind}"
                    if name in weights:
                        weights[name] = unpermute_rows(weights[name], heads)

    def biases(names):
        return {n.split(".")[-1] for n in names
                if f"model.layers.0.{n}.bias" in weights}

    attn_biases = biases(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"])
    mlp_biases = biases(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    if arch == "qwen2" and not {"q_proj", "k_proj", "v_proj"} <= attn_biases:
        fail("qwen2 GGUF without q/k/v biases")

    spec = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_layers": n_layers,
        "num_heads": n_heads,
        "num_kv_heads": n_kv,
        "head_dim": head_dim,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "vocab_size": vocab,
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", required=True)),
        "inv_freq": inv_freq,
        "attention_factor": 1.0,
        "attn_biases": attn_biases,
        "mlp_biases": mlp_biases,
        "qk_norm": arch == "qwen3",
        "sliding_windows": [None] * n_layers,
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    return spec, weights


def main(argv):
    if len(argv) < 2:
        fail("usage: python3 gguf_reference.py MODEL.gguf IDS_JSON OUT_JSON [--logprobs-only]")
    spec, weights = read(argv[1])
    ref.run(spec, weights, argv[2:], "gguf_reference.py")


if __name__ == "__main__":
    try:
        main(sys.argv)
    except ref.RefError as e:
        print(f"gguf_reference: error: {e}", file=sys.stderr)
        sys.exit(2)
