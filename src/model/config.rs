//! The Llama family's settings, read from a Hugging Face `config.json` as
//! transformers reads it, and written back in the transformers-v5 layout.
//!
//! One config serves four architectures whose blocks differ by a flag
//! (llama.cpp's way, not one file per relative):
//!
//! | architecture        | q/k/v bias         | o bias         | MLP bias   | q/k norm |
//! |---------------------|--------------------|----------------|------------|----------|
//! | `LlamaForCausalLM`  | `attention_bias`   | `attention_bias` | `mlp_bias` | no     |
//! | `MistralForCausalLM`| no                 | no             | no         | no       |
//! | `Qwen2ForCausalLM`  | always             | no             | no         | no       |
//! | `Qwen3ForCausalLM`  | `attention_bias`   | `attention_bias` | no       | yes      |
//!
//! Two layouts are in use: v4 (most of the Hub) has a top-level
//! `rope_theta`, an optional `rope_scaling` (`rope_type`, or the legacy
//! `type`) and `torch_dtype`; v5 (what `save_pretrained` writes now) has
//! `rope_parameters` and `dtype`. RoPE types `default`, `linear` and
//! `llama3` are computed as transformers' `modeling_rope_utils.py` does;
//! anything else that would change the math (another RoPE type, an active
//! sliding window shorter than the context, another activation, partial
//! rotary embeddings, per-layer attention types) is refused by name.

use serde_json::{json, Map, Value};

/// The architecture family member a checkpoint declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
        Architecture::Qwen3,
    ];

    /// transformers' class name (`architectures[0]`).
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// transformers' `model_type` (and llama.cpp's `general.architecture`,
    /// except that llama.cpp calls Mistral `llama`).
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
        }
    }

    /// What a GGUF file of this architecture loads back as: llama.cpp
    /// files Mistral under `llama` (the same tensors and math).
    pub fn gguf_family(self) -> Architecture {
        match self {
            Architecture::Mistral => Architecture::Llama,
            other => other,
        }
    }

    pub fn from_model_type(model_type: &str) -> Option<Architecture> {
        Architecture::ALL
            .into_iter()
            .find(|a| a.model_type() == model_type)
    }
}

/// How the rotary frequencies are computed (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeType {
    Default,
    /// Positions divided by `factor` (inv_freq / factor).
    Linear {
        factor: f64,
    },
    /// Llama 3.1/3.2: long wavelengths divided by `factor`, short ones
    /// kept, a smooth blend between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeParameters {
    pub rope_theta: f64,
    pub rope_type: RopeType,
}

impl RopeParameters {
    pub fn theta(rope_theta: f64) -> RopeParameters {
        RopeParameters {
            rope_theta,
            rope_type: RopeType::Default,
        }
    }

    /// Inverse frequency of each of the `head_dim / 2` rotary pairs.
    pub fn inv_freq(&self, head_dim: usize) -> Vec<f64> {
        let base: Vec<f64> = (0..head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        match self.rope_type {
            RopeType::Default => base,
            RopeType::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeType::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("rope_theta".into(), json!(self.rope_theta));
        match &self.rope_type {
            RopeType::Default => {
                m.insert("rope_type".into(), json!("default"));
            }
            RopeType::Linear { factor } => {
                m.insert("rope_type".into(), json!("linear"));
                m.insert("factor".into(), json!(factor));
            }
            RopeType::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                m.insert("rope_type".into(), json!("llama3"));
                m.insert("factor".into(), json!(factor));
                m.insert("low_freq_factor".into(), json!(low_freq_factor));
                m.insert("high_freq_factor".into(), json!(high_freq_factor));
                m.insert(
                    "original_max_position_embeddings".into(),
                    json!(*original_max_position_embeddings as u64),
                );
            }
        }
        Value::Object(m)
    }
}

/// Which transformers layout a config.json was read in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigLayout {
    /// Top-level `rope_theta` / `rope_scaling`, `torch_dtype`.
    TransformersV4,
    /// `rope_parameters`, `dtype`.
    TransformersV5,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` for grouped-query attention.
    pub num_key_value_heads: Option<usize>,
    /// Explicit head width; `hidden_size / num_attention_heads` when absent.
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rope: RopeParameters,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (Llama, Qwen3); Qwen2 has q/k/v biases regardless.
    pub attention_bias: bool,
    /// Biases on the MLP's projections (Llama only).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Generation stops on any of these (an int or a list in config.json).
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// The dtype the checkpoint declared (`dtype` / `torch_dtype`); posttrain
    /// computes in f32 and saves f32.
    pub dtype: Option<String>,
    /// The layout it was read in (saved folders are always v5).
    pub layout: ConfigLayout,
    /// Added to a reward model's score (set by the reward stage's
    /// `normalize`); absent for other models.
    pub reward_offset: Option<f64>,
}

/// A config.json that cannot be used, naming the field.
pub type ConfigProblem = String;

impl LlamaConfig {
    /// A small Llama with the given widths and the usual defaults.
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> LlamaConfig {
        LlamaConfig {
            architecture: Architecture::Llama,
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 8 / 3,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            head_dim: None,
            max_position_embeddings: 512,
            rope: RopeParameters::theta(10000.0),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: None,
            eos_token_id: Vec::new(),
            pad_token_id: None,
            dtype: None,
            layout: ConfigLayout::TransformersV5,
            reward_offset: None,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q_proj, k_proj and v_proj have biases.
    pub fn qkv_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 => true,
            Architecture::Mistral => false,
            Architecture::Llama | Architecture::Qwen3 => self.attention_bias,
        }
    }

    /// Whether o_proj has a bias.
    pub fn o_bias(&self) -> bool {
        match self.architecture {
            Architecture::Qwen2 | Architecture::Mistral => false,
            Architecture::Llama | Architecture::Qwen3 => self.attention_bias,
        }
    }

    /// Whether the MLP's projections have biases.
    pub fn mlp_biases(&self) -> bool {
        self.architecture == Architecture::Llama && self.mlp_bias
    }

    /// Whether queries and keys get a per-head RMSNorm before RoPE (Qwen3).
    pub fn qk_norm(&self) -> bool {
        self.architecture == Architecture::Qwen3
    }

    /// Read a config.json's value as transformers does.
    pub fn from_json(v: &Value) -> Result<LlamaConfig, ConfigProblem> {
        let obj = v
            .as_object()
            .ok_or_else(|| "config.json is not a JSON object".to_string())?;
        let architecture = architecture(obj)?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let size = |k: &str| -> Result<usize, ConfigProblem> {
            match get(k) {
                None => Err(format!("`{k}` is missing")),
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| format!("`{k}` must be a non-negative integer, not {v}")),
            }
        };
        let opt_size = |k: &str| -> Result<Option<usize>, ConfigProblem> {
            get(k).map(|_| size(k)).transpose()
        };
        let float = |k: &str, default: f64| -> Result<f64, ConfigProblem> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| format!("`{k}` must be a number, not {v}")),
            }
        };
        let flag = |k: &str, default: bool| -> Result<bool, ConfigProblem> {
            match get(k) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| format!("`{k}` must be true or false, not {v}")),
            }
        };
        if let Some(act) = get("hidden_act") {
            if act.as_str() != Some("silu") {
                return Err(format!(
                    "`hidden_act` is {act}; posttrain implements the SwiGLU MLP with \"silu\" only"
                ));
            }
        }
        if let Some(p) = get("partial_rotary_factor") {
            if p.as_f64() != Some(1.0) {
                return Err(format!(
                    "`partial_rotary_factor` is {p}; posttrain rotates whole heads (1.0) only"
                ));
            }
        }
        let max_position_embeddings =
            opt_size("max_position_embeddings")?.unwrap_or(match architecture {
                Architecture::Llama => 2048,
                Architecture::Mistral => 4096 * 32,
                Architecture::Qwen2 | Architecture::Qwen3 => 32768,
            });
        let (layout, rope) = rope(obj, max_position_embeddings)?;
        check_sliding_window(obj, architecture, max_position_embeddings)?;
        // Qwen3's config class defaults head_dim to 128; the others derive it.
        let head_dim = match opt_size("head_dim")? {
            Some(d) => Some(d),
            None if architecture == Architecture::Qwen3 => Some(128),
            None => None,
        };
        let ids = |k: &str| -> Result<Vec<u32>, ConfigProblem> {
            match get(k) {
                None => Ok(Vec::new()),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|x| x.as_u64().map(|n| n as u32))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| format!("`{k}` must be a token id or a list of them")),
                Some(x) => x
                    .as_u64()
                    .map(|n| vec![n as u32])
                    .ok_or_else(|| format!("`{k}` must be a token id or a list of them")),
            }
        };
        let one_id =
            |k: &str| -> Result<Option<u32>, ConfigProblem> { Ok(ids(k)?.first().copied()) };
        let dtype = get("dtype")
            .or_else(|| get("torch_dtype"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let cfg = LlamaConfig {
            architecture,
            vocab_size: size("vocab_size")?,
            hidden_size: size("hidden_size")?,
            intermediate_size: size("intermediate_size")?,
            num_hidden_layers: size("num_hidden_layers")?,
            num_attention_heads: size("num_attention_heads")?,
            num_key_value_heads: match obj.get("num_key_value_heads") {
                // The config classes' defaults when the key is absent; null
                // means one key/value head per query head.
                None => match architecture {
                    Architecture::Llama => None,
                    Architecture::Mistral => Some(8),
                    Architecture::Qwen2 | Architecture::Qwen3 => Some(32),
                },
                Some(_) => opt_size("num_key_value_heads")?,
            },
            head_dim,
            max_position_embeddings,
            rope,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
            tie_word_embeddings: flag("tie_word_embeddings", false)?,
            attention_bias: flag("attention_bias", false)?,
            mlp_bias: flag("mlp_bias", false)?,
            bos_token_id: one_id("bos_token_id")?,
            eos_token_id: ids("eos_token_id")?,
            pad_token_id: one_id("pad_token_id")?,
            dtype,
            layout,
            reward_offset: get("reward_offset").and_then(Value::as_f64),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config.json posttrain writes: transformers v5's layout, f32.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "architectures".into(),
            json!([self.architecture.class_name()]),
        );
        m.insert("model_type".into(), json!(self.architecture.model_type()));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_hidden_layers));
        m.insert(
            "num_attention_heads".into(),
            json!(self.num_attention_heads),
        );
        m.insert("num_key_value_heads".into(), json!(self.kv_heads()));
        m.insert("head_dim".into(), json!(self.head_dim()));
        m.insert(
            "max_position_embeddings".into(),
            json!(self.max_position_embeddings),
        );
        m.insert("rope_parameters".into(), self.rope.to_json());
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("hidden_act".into(), json!("silu"));
        m.insert(
            "tie_word_embeddings".into(),
            json!(self.tie_word_embeddings),
        );
        match self.architecture {
            Architecture::Llama => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert("mlp_bias".into(), json!(self.mlp_bias));
            }
            Architecture::Qwen3 => {
                m.insert("attention_bias".into(), json!(self.attention_bias));
                m.insert("use_sliding_window".into(), json!(false));
            }
            Architecture::Qwen2 => {
                m.insert("use_sliding_window".into(), json!(false));
            }
            Architecture::Mistral => {
                m.insert("sliding_window".into(), Value::Null);
            }
        }
        if let Some(b) = self.bos_token_id {
            m.insert("bos_token_id".into(), json!(b));
        }
        match self.eos_token_id.as_slice() {
            [] => {}
            [one] => {
                m.insert("eos_token_id".into(), json!(one));
            }
            many => {
                m.insert("eos_token_id".into(), json!(many));
            }
        }
        if let Some(p) = self.pad_token_id {
            m.insert("pad_token_id".into(), json!(p));
        }
        m.insert("dtype".into(), json!("float32"));
        // Which layout this file is in, for readers that key on it.
        m.insert("transformers_version".into(), json!("5.0.0"));
        if let Some(r) = self.reward_offset {
            m.insert("reward_offset".into(), json!(r));
        }
        Value::Object(m)
    }

    /// Shape checks a checkpoint's config must pass: `Err(message)`.
    pub fn validate(&self) -> Result<(), ConfigProblem> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(format!("`{name}` must be positive"));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {} (and no `head_dim` is given)",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "`num_attention_heads` {} is not a multiple of `num_key_value_heads` {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "the head size {} (`head_dim`) must be even and positive for rotary embeddings",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Parameters in the model (with the LM head unless tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let hd = self.head_dim();
        let (q, kv) = (self.num_attention_heads * hd, self.kv_heads() * hd);
        let mut layer = 2 * h + h * q * 2 + 2 * h * kv + 3 * h * i;
        if self.qkv_bias() {
            layer += q + 2 * kv;
        }
        if self.o_bias() {
            layer += h;
        }
        if self.mlp_biases() {
            layer += 2 * i + h;
        }
        if self.qk_norm() {
            layer += 2 * hd;
        }
        v * h
            + self.num_hidden_layers * layer
            + h
            + if self.tie_word_embeddings { 0 } else { v * h }
    }
}

fn architecture(obj: &Map<String, Value>) -> Result<Architecture, ConfigProblem> {
    let supported = || {
        Architecture::ALL
            .iter()
            .map(|a| a.class_name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let model_type = obj.get("model_type").and_then(Value::as_str);
    let classes: Vec<&str> = obj
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let by_type = model_type.map(|t| {
        Architecture::from_model_type(t).ok_or_else(|| {
            format!(
                "`model_type` is \"{t}\"; posttrain loads {} (model_type llama, mistral, qwen2, qwen3)",
                supported()
            )
        })
    });
    let arch = match by_type {
        Some(a) => a?,
        None => Architecture::Llama,
    };
    for class in &classes {
        // The base model class (LlamaModel) holds the same tensors.
        let base = class
            .trim_end_matches("ForCausalLM")
            .trim_end_matches("Model");
        let matches = Architecture::ALL.iter().find(|a| {
            a.class_name()
                .trim_end_matches("ForCausalLM")
                .eq_ignore_ascii_case(base)
        });
        match matches {
            Some(a) if *a == arch => {}
            Some(_) | None => {
                return Err(format!(
                    "`architectures` lists {class} (model_type {}); posttrain loads {}",
                    model_type.unwrap_or("absent"),
                    supported()
                ))
            }
        }
    }
    Ok(arch)
}

/// RoPE settings from either layout.
fn rope(
    obj: &Map<String, Value>,
    max_positions: usize,
) -> Result<(ConfigLayout, RopeParameters), ConfigProblem> {
    let nonnull = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
    let (layout, params, field) = match nonnull(obj.get("rope_parameters")) {
        Some(p) => (ConfigLayout::TransformersV5, p, "rope_parameters"),
        None => {
            let mut p = match nonnull(obj.get("rope_scaling")) {
                Some(Value::Object(m)) => m,
                Some(other) => {
                    return Err(format!("`rope_scaling` must be an object, not {other}"))
                }
                None => Map::new(),
            };
            if let Some(t) = obj.get("rope_theta").filter(|v| !v.is_null()) {
                p.insert("rope_theta".into(), t.clone());
            }
            (
                ConfigLayout::TransformersV4,
                Value::Object(p),
                "rope_scaling",
            )
        }
    };
    let p = params
        .as_object()
        .ok_or_else(|| format!("`{field}` must be an object"))?;
    if p.values().any(Value::is_object) {
        return Err(format!(
            "`{field}` holds RoPE settings per attention type; posttrain has one RoPE for all layers"
        ));
    }
    let num = |k: &str, default: Option<f64>| -> Result<f64, ConfigProblem> {
        match p.get(k).filter(|v| !v.is_null()) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("`{field}.{k}` must be a number, not {v}")),
            None => default.ok_or_else(|| format!("`{field}.{k}` is missing")),
        }
    };
    let theta_field = if layout == ConfigLayout::TransformersV4 {
        obj.get("rope_theta")
            .and_then(Value::as_f64)
            .unwrap_or(10000.0)
    } else {
        num("rope_theta", Some(10000.0))?
    };
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let rope_type = match kind {
        "default" => RopeType::Default,
        "linear" => RopeType::Linear {
            factor: num("factor", None)?,
        },
        "llama3" => RopeType::Llama3 {
            factor: num("factor", None)?,
            low_freq_factor: num("low_freq_factor", None)?,
            high_freq_factor: num("high_freq_factor", None)?,
            original_max_position_embeddings: num(
                "original_max_position_embeddings",
                Some(
                    obj.get("original_max_position_embeddings")
                        .and_then(Value::as_f64)
                        .unwrap_or(max_positions as f64),
                ),
            )?,
        },
        other => {
            return Err(format!(
                "`{field}.rope_type` is \"{other}\"; posttrain computes \"default\", \"linear\" and \"llama3\" RoPE only"
            ))
        }
    };
    if let RopeType::Linear { factor } | RopeType::Llama3 { factor, .. } = rope_type {
        if factor <= 0.0 {
            return Err(format!("`{field}.factor` must be positive, not {factor}"));
        }
    }
    if let RopeType::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = rope_type
    {
        if high_freq_factor <= low_freq_factor {
            return Err(format!(
                "`{field}.high_freq_factor` {high_freq_factor} must exceed `low_freq_factor` {low_freq_factor}"
            ));
        }
    }
    if let Some(a) = p.get("attention_factor").filter(|v| !v.is_null()) {
        if a.as_f64() != Some(1.0) {
            return Err(format!(
                "`{field}.attention_factor` is {a}; posttrain scales attention by 1.0 only"
            ));
        }
    }
    Ok((
        layout,
        RopeParameters {
            rope_theta: theta_field,
            rope_type,
        },
    ))
}

/// posttrain attends to every earlier token; a sliding window that would
/// cut that off within the model's context is refused.
fn check_sliding_window(
    obj: &Map<String, Value>,
    arch: Architecture,
    max_positions: usize,
) -> Result<(), ConfigProblem> {
    let window = obj.get("sliding_window").and_then(Value::as_u64);
    let active = match arch {
        // Mistral applies `sliding_window` whenever it is set; its config
        // class defaults it to 4096 when the key is absent.
        Architecture::Mistral => match obj.get("sliding_window") {
            None => Some(4096),
            Some(_) => window,
        },
        // Qwen applies it only with `use_sliding_window`.
        Architecture::Qwen2 | Architecture::Qwen3 => obj
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(false)
            .then_some(window.unwrap_or(4096)),
        Architecture::Llama => None,
    };
    if let Some(w) = active {
        if (w as usize) < max_positions {
            return Err(format!(
                "`sliding_window` is {w}, shorter than `max_position_embeddings` {max_positions}; \
                 posttrain has no sliding-window attention (set it to null if the model never sees longer sequences)"
            ));
        }
    }
    if let Some(types) = obj.get("layer_types").and_then(Value::as_array) {
        if let Some(t) = types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "full_attention")
        {
            return Err(format!(
                "`layer_types` has \"{t}\" layers; posttrain implements \"full_attention\" only"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: Value) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn err(extra: Value) -> String {
        LlamaConfig::from_json(&base(extra)).unwrap_err()
    }

    #[test]
    fn both_layouts_read_the_same_rope() {
        let v4 = LlamaConfig::from_json(&base(json!({
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "torch_dtype": "bfloat16"
        })))
        .unwrap();
        let v5 = LlamaConfig::from_json(&base(json!({
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
            "dtype": "bfloat16"
        })))
        .unwrap();
        assert_eq!(v4.layout, ConfigLayout::TransformersV4);
        assert_eq!(v5.layout, ConfigLayout::TransformersV5);
        assert_eq!(v4.rope, v5.rope);
        assert_eq!(v4.dtype.as_deref(), Some("bfloat16"));
        // The legacy `type` key, and theta without scaling.
        let legacy = LlamaConfig::from_json(&base(
            json!({"rope_theta": 100000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        ))
        .unwrap();
        assert_eq!(legacy.rope.rope_type, RopeType::Linear { factor: 2.0 });
        assert_eq!(legacy.rope.rope_theta, 100000.0);
        let plain = LlamaConfig::from_json(&base(json!({}))).unwrap();
        assert_eq!(plain.rope, RopeParameters::theta(10000.0));
    }

    #[test]
    fn written_config_reads_back_the_same() {
        for arch in Architecture::ALL {
            let mut cfg = LlamaConfig::tiny(10, 8, 1, 2, 1);
            cfg.architecture = arch;
            cfg.head_dim = Some(6);
            cfg.attention_bias = arch == Architecture::Llama;
            cfg.eos_token_id = vec![2, 7];
            cfg.dtype = Some("float32".into()); // what posttrain writes
            cfg.rope.rope_type = RopeType::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            };
            let back = LlamaConfig::from_json(&cfg.to_json()).unwrap();
            assert_eq!(back, cfg, "{arch:?}");
        }
    }

    #[test]
    fn llama3_frequencies_follow_the_three_bands() {
        let rope = RopeParameters {
            rope_theta: 10000.0,
            rope_type: RopeType::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64.0,
            },
        };
        let base = RopeParameters::theta(10000.0).inv_freq(16);
        let scaled = rope.inv_freq(16);
        for (b, s) in base.iter().zip(&scaled) {
            let wavelen = 2.0 * std::f64::consts::PI / b;
            if wavelen < 16.0 {
                assert_eq!(s, b); // short wavelengths kept
            } else if wavelen > 64.0 {
                assert!((s - b / 8.0).abs() < 1e-15); // long ones divided
            } else {
                assert!(*s < *b && *s > b / 8.0); // blended
            }
        }
        assert!(base.iter().any(|b| 2.0 * std::f64::consts::PI / b > 64.0));
        assert!(base.iter().any(|b| 2.0 * std::f64::consts::PI / b < 16.0));
    }

    #[test]
    fn unsupported_variants_are_refused_by_name() {
        let e = err(json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}));
        assert!(e.contains("`rope_scaling.rope_type` is \"yarn\""), "{e}");
        let e = err(json!({"rope_parameters": {"rope_type": "dynamic", "factor": 4.0}}));
        assert!(
            e.contains("`rope_parameters.rope_type` is \"dynamic\""),
            "{e}"
        );
        let e = err(json!({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}));
        assert!(e.contains("`model_type` is \"gemma\""), "{e}");
        let e = err(json!({"architectures": ["LlamaForSequenceClassification"]}));
        assert!(
            e.contains("`architectures` lists LlamaForSequenceClassification"),
            "{e}"
        );
        let e = err(
            json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                           "sliding_window": 4096, "max_position_embeddings": 32768}),
        );
        assert!(e.contains("`sliding_window` is 4096"), "{e}");
        let e = err(json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}));
        assert!(e.contains("`sliding_window` is 4096"), "{e}");
        let e = err(
            json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                           "use_sliding_window": true, "sliding_window": 1024}),
        );
        assert!(e.contains("`sliding_window` is 1024"), "{e}");
        let e = err(json!({"hidden_act": "gelu"}));
        assert!(e.contains("`hidden_act`"), "{e}");
        let e = err(json!({"rope_scaling": {"rope_type": "linear"}}));
        assert!(e.contains("`rope_scaling.factor` is missing"), "{e}");
        let e = err(json!({"layer_types": ["full_attention", "sliding_attention"]}));
        assert!(e.contains("`layer_types`"), "{e}");
        let e = err(json!({"partial_rotary_factor": 0.5}));
        assert!(e.contains("`partial_rotary_factor`"), "{e}");
        // Allowed: a null window, Qwen's inactive window, an explicit head_dim.
        for ok in [
            json!({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": null}),
            json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                   "use_sliding_window": false, "sliding_window": 4096}),
            json!({"head_dim": 6}),
        ] {
            LlamaConfig::from_json(&base(ok)).unwrap();
        }
    }

    #[test]
    fn architecture_flags() {
        let qwen2 = LlamaConfig::from_json(&base(
            json!({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
        ))
        .unwrap();
        assert!(qwen2.qkv_bias() && !qwen2.o_bias() && !qwen2.qk_norm());
        let qwen3 = LlamaConfig::from_json(&base(
            json!({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}),
        ))
        .unwrap();
        assert!(!qwen3.qkv_bias() && qwen3.qk_norm());
        assert_eq!(qwen3.head_dim(), 128, "Qwen3Config's default head_dim");
        let eos = LlamaConfig::from_json(&base(json!({"eos_token_id": [2, 5]}))).unwrap();
        assert_eq!(eos.eos_token_id, vec![2, 5]);
    }
}
