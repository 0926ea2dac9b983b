//! GGUF files as checkpoints: llama.cpp's metadata and tensor names mapped
//! to [`LlamaConfig`] and Hugging Face names, in both directions.
//!
//! | GGUF                          | Hugging Face                            |
//! |-------------------------------|-----------------------------------------|
//! | `token_embd`                  | `model.embed_tokens`                    |
//! | `blk.N.attn_norm`             | `model.layers.N.input_layernorm`        |
//! | `blk.N.attn_q` / `_k` / `_v`  | `...self_attn.q_proj` / `k_proj` / `v_proj` (weight, bias) |
//! | `blk.N.attn_q_norm` / `_k_norm` | `...self_attn.q_norm` / `k_norm` (Qwen3) |
//! | `blk.N.attn_output`           | `...self_attn.o_proj`                   |
//! | `blk.N.ffn_norm`              | `...post_attention_layernorm`           |
//! | `blk.N.ffn_gate` / `_up` / `_down` | `...mlp.gate_proj` / `up_proj` / `down_proj` |
//! | `output_norm`, `output`       | `model.norm`, `lm_head` (absent: tied)  |
//!
//! llama.cpp's converter permutes the rows of q and k (weights and biases)
//! for the `llama` architecture only (its rotary layout pairs neighbours;
//! Qwen's GGUF keeps Hugging Face's order): loading undoes it, export
//! redoes it. llama.cpp files Mistral under `llama`, so a Mistral GGUF
//! loads as a Llama (the same tensors and math).

use std::path::Path;

use dfdx::prelude::*;

use super::checkpoint::CheckpointError;
use super::config::{Architecture, ConfigLayout, LlamaConfig, RopeParameters, RopeType};
use super::params::{expected_shapes, LlamaParams};
use crate::gguf::{self, GgmlType, GgufFile, Value, WriteTensor};

fn bad(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Config {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl From<gguf::GgufError> for CheckpointError {
    fn from(e: gguf::GgufError) -> CheckpointError {
        CheckpointError::Gguf(e.to_string())
    }
}

/// llama.cpp's architecture name for posttrain's.
fn gguf_arch(a: Architecture) -> &'static str {
    match a.gguf_family() {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
    }
}

/// The Hugging Face name of a GGUF tensor, or `None` when unknown.
fn hf_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_output" => "self_attn.o_proj",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The GGUF name of a Hugging Face tensor (the inverse of [`hf_name`]).
fn gguf_name(hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let g = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The config a GGUF file's metadata and tensor table describe.
pub fn config_of(file: &GgufFile) -> Result<LlamaConfig, CheckpointError> {
    let path = &file.path;
    let arch_name = file
        .get("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(path, "no `general.architecture`"))?;
    let architecture = match arch_name {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        other => {
            return Err(bad(
                path,
                format!("`general.architecture` is \"{other}\"; posttrain loads llama, qwen2 and qwen3 GGUF files"),
            ))
        }
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let size = |k: &str| -> Result<Option<usize>, CheckpointError> {
        match file.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(path, format!("`{}` must be an integer", key(k)))),
        }
    };
    let need = |k: &str| -> Result<usize, CheckpointError> {
        size(k)?.ok_or_else(|| bad(path, format!("`{}` is missing", key(k))))
    };
    let float = |k: &str| file.get(&key(k)).and_then(Value::as_f64);
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let vocab = match size("vocab_size")? {
        Some(v) => v,
        None => file
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .ok_or_else(|| bad(path, "neither a vocab_size nor tokenizer.ggml.tokens"))?,
    };
    let head_dim = size("attention.key_length")?;
    let effective_hd = head_dim.unwrap_or(hidden / heads.max(1));
    if let Some(rot) = size("rope.dimension_count")? {
        if rot != effective_hd {
            return Err(bad(
                path,
                format!("`{}` is {rot} but heads are {effective_hd} wide; posttrain rotates whole heads only", key("rope.dimension_count")),
            ));
        }
    }
    let context = size("context_length")?.unwrap_or(2048);
    let scaling = file
        .get(&key("rope.scaling.type"))
        .and_then(Value::as_str)
        .unwrap_or("none");
    let rope_type = match scaling {
        "none" => RopeType::Default,
        "linear" => RopeType::Linear {
            factor: float("rope.scaling.factor")
                .ok_or_else(|| bad(path, format!("`{}` is missing", key("rope.scaling.factor"))))?,
        },
        other => {
            return Err(bad(
                path,
                format!(
                "`{}` is \"{other}\"; posttrain computes none and linear RoPE scaling from GGUF",
                key("rope.scaling.type")
            ),
            ))
        }
    };
    if file.tensor("rope_freqs.weight").is_some() {
        return Err(bad(
            path,
            "the file has `rope_freqs.weight` (Llama 3.1-style RoPE frequency factors); load the Hugging Face folder instead, whose config.json names the `llama3` RoPE",
        ));
    }
    if let Some(w) = size("attention.sliding_window")? {
        if w < context {
            return Err(bad(
                path,
                format!("`{}` is {w}, shorter than the context {context}; posttrain has no sliding-window attention", key("attention.sliding_window")),
            ));
        }
    }
    let has = |n: &str| file.tensor(n).is_some();
    let cfg = LlamaConfig {
        architecture,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: Some(size("attention.head_count_kv")?.unwrap_or(heads)),
        head_dim,
        max_position_embeddings: context,
        rope: RopeParameters {
            rope_theta: float("rope.freq_base").unwrap_or(10000.0),
            rope_type,
        },
        rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        tie_word_embeddings: !has("output.weight"),
        attention_bias: architecture != Architecture::Qwen2 && has("blk.0.attn_q.bias"),
        mlp_bias: has("blk.0.ffn_gate.bias"),
        bos_token_id: file
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|n| n as u32),
        eos_token_id: file
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|n| vec![n as u32])
            .unwrap_or_default(),
        pad_token_id: file
            .get("tokenizer.ggml.padding_token_id")
            .and_then(Value::as_u64)
            .map(|n| n as u32),
        dtype: None,
        layout: ConfigLayout::TransformersV5,
        reward_offset: None,
    };
    cfg.validate().map_err(|m| bad(path, m))?;
    Ok(cfg)
}

/// Whether llama.cpp permuted this tensor's rows, and over how many heads.
fn permuted_heads(cfg: &LlamaConfig, hf: &str) -> Option<usize> {
    if gguf_arch(cfg.architecture) != "llama" {
        return None;
    }
    if hf.contains("self_attn.q_proj.") {
        Some(cfg.num_attention_heads)
    } else if hf.contains("self_attn.k_proj.") {
        Some(cfg.kv_heads())
    } else {
        None
    }
}

/// Load a GGUF file: every tensor dequantized to f32 and back in Hugging
/// Face's layout, checked against the config its metadata gives.
pub fn load<D: Device<f32>>(path: &Path, dev: &D) -> Result<LlamaParams<f32, D>, CheckpointError> {
    load_file(&GgufFile::open(path)?, dev)
}

/// [`load`] of a file already opened (its header read once).
pub fn load_file<D: Device<f32>>(
    file: &GgufFile,
    dev: &D,
) -> Result<LlamaParams<f32, D>, CheckpointError> {
    let path = &file.path;
    let cfg = config_of(file)?;
    let expected = expected_shapes(&cfg, false);
    let mut problems = Vec::new();
    for t in &file.tensors {
        match hf_name(&t.name) {
            Some(n) if expected.iter().any(|(e, _)| *e == n) => {}
            _ => problems.push(format!("unexpected tensor `{}`", t.name)),
        }
    }
    let mut tensors = Vec::with_capacity(expected.len());
    for (name, (r, c)) in &expected {
        let g = gguf_name(name).expect("every parameter has a GGUF name");
        let Some(info) = file.tensor(&g) else {
            problems.push(format!("missing tensor `{g}`"));
            continue;
        };
        let n = info.n_elements() as usize;
        if n != r * c {
            problems.push(format!(
                "`{g}` has shape {:?}, the metadata implies ({r}, {c})",
                info.shape()
            ));
            continue;
        }
        let mut values = file.tensor_f32(&g)?;
        if let Some(heads) = permuted_heads(&cfg, name) {
            // A bias is one column.
            let (rows, cols) = if name.ends_with(".bias") {
                (*c, 1)
            } else {
                (*r, *c)
            };
            values = gguf::unpermute_qk(&values, heads, rows, cols);
        }
        tensors.push(dev.tensor_from_vec(values, (*r, *c)));
    }
    if !problems.is_empty() {
        return Err(CheckpointError::Mismatch {
            dir: path.to_path_buf(),
            problems: problems.join("; "),
        });
    }
    Ok(LlamaParams::from_named(cfg, tensors, false))
}

/// The quantization of an exported file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    /// Q8_0 for matrices whose rows are a multiple of 32 values; vectors
    /// (norms, biases) stay F32, as llama.cpp's quantizer keeps them.
    Q8_0,
}

impl ExportType {
    pub fn parse(s: &str) -> Option<ExportType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(ExportType::F32),
            "f16" => Some(ExportType::F16),
            "q8_0" => Some(ExportType::Q8_0),
            _ => None,
        }
    }

    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_*).
    fn file_type(self) -> u32 {
        match self {
            ExportType::F32 => 0,
            ExportType::F16 => 1,
            ExportType::Q8_0 => 7,
        }
    }
}

/// The metadata describing a model (not its tokenizer).
fn model_metadata(cfg: &LlamaConfig, name: &str, kind: ExportType) -> Vec<(String, Value)> {
    let a = gguf_arch(cfg.architecture);
    let u32v = |n: usize| Value::U32(n as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::String(a.into())),
        ("general.name".to_string(), Value::String(name.into())),
        (
            "general.file_type".to_string(),
            Value::U32(kind.file_type()),
        ),
        ("general.quantization_version".to_string(), Value::U32(2)),
        (format!("{a}.block_count"), u32v(cfg.num_hidden_layers)),
        (
            format!("{a}.context_length"),
            u32v(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u32v(cfg.hidden_size)),
        (
            format!("{a}.feed_forward_length"),
            u32v(cfg.intermediate_size),
        ),
        (
            format!("{a}.attention.head_count"),
            u32v(cfg.num_attention_heads),
        ),
        (format!("{a}.attention.head_count_kv"), u32v(cfg.kv_heads())),
        (format!("{a}.attention.key_length"), u32v(cfg.head_dim())),
        (format!("{a}.attention.value_length"), u32v(cfg.head_dim())),
        (format!("{a}.rope.dimension_count"), u32v(cfg.head_dim())),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(cfg.rope.rope_theta as f32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (format!("{a}.vocab_size"), u32v(cfg.vocab_size)),
    ];
    if let RopeType::Linear { factor } = cfg.rope.rope_type {
        m.push((
            format!("{a}.rope.scaling.type"),
            Value::String("linear".into()),
        ));
        m.push((
            format!("{a}.rope.scaling.factor"),
            Value::F32(factor as f32),
        ));
    }
    m
}

/// Write a model as a GGUF file with the tokenizer metadata given
/// (`tokenizer.*` keys). Refused: a reward model (GGUF has no score head)
/// and RoPE types GGUF cannot express (llama3: llama.cpp keeps it as a
/// frequency tensor posttrain does not write).
pub fn export<D: Device<f32>>(
    params: &LlamaParams<f32, D>,
    tokenizer_metadata: Vec<(String, Value)>,
    name: &str,
    kind: ExportType,
    path: &Path,
) -> Result<(), CheckpointError> {
    let cfg = &params.config;
    if params.score.is_some() {
        return Err(bad(
            path,
            "a reward or value model (score head) has no GGUF form; export a policy",
        ));
    }
    if matches!(cfg.rope.rope_type, RopeType::Llama3 { .. }) {
        return Err(bad(path, "the model's `llama3` RoPE has no GGUF metadata posttrain writes; export it as a Hugging Face folder"));
    }
    let mut metadata = model_metadata(cfg, name, kind);
    metadata.extend(tokenizer_metadata);
    let named = params.named();
    let mut values: Vec<(String, Vec<usize>, Vec<f32>, GgmlType)> = Vec::with_capacity(named.len());
    for (hf, t) in &named {
        let (r, c) = *t.shape();
        let mut v = t.as_vec();
        let vector = super::params::is_vector(hf);
        if let Some(heads) = permuted_heads(cfg, hf) {
            let (rows, cols) = if vector { (c, 1) } else { (r, c) };
            v = gguf::permute_qk(&v, heads, rows, cols);
        }
        let shape = if vector { vec![c] } else { vec![r, c] };
        let ty = match kind {
            _ if vector => GgmlType::F32,
            ExportType::F32 => GgmlType::F32,
            ExportType::F16 => GgmlType::F16,
            ExportType::Q8_0 if c % 32 == 0 => GgmlType::Q8_0,
            ExportType::Q8_0 => GgmlType::F16,
        };
        values.push((
            gguf_name(hf).expect("every parameter has a GGUF name"),
            shape,
            v,
            ty,
        ));
    }
    let tensors: Vec<WriteTensor> = values
        .iter()
        .map(|(n, s, v, k)| WriteTensor {
            name: n.clone(),
            shape: s.clone(),
            values: v,
            kind: *k,
        })
        .collect();
    gguf::write(path, &metadata, &tensors)?;
    Ok(())
}

/// Export a model folder (weights, tokenizer, chat template) as GGUF.
pub fn export_folder(dir: &Path, out: &Path, kind: ExportType) -> Result<(), CheckpointError> {
    let params = super::checkpoint::load(dir, &crate::model::Dev::default())?;
    let tokenizer = crate::chat::gguf_vocab::gguf_metadata(dir)
        .map_err(|e| CheckpointError::Gguf(e.to_string()))?;
    let name = dir.file_name().map_or_else(
        || "posttrain".to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    export(&params, tokenizer, &name, kind, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for arch in Architecture::ALL {
            let mut cfg = LlamaConfig::tiny(10, 8, 2, 2, 1);
            cfg.architecture = arch;
            cfg.attention_bias = true;
            cfg.mlp_bias = true;
            for (n, _) in expected_shapes(&cfg, false) {
                let g = gguf_name(&n).unwrap_or_else(|| panic!("{n}"));
                assert_eq!(hf_name(&g).as_deref(), Some(n.as_str()));
            }
        }
    }
}
