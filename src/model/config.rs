//! The Llama architecture's settings, read from and written to a Hugging
//! Face `config.json` (field names as `LlamaConfig` spells them).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Fewer than `num_attention_heads` for grouped-query attention.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_architectures")]
    pub architectures: Vec<String>,
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Added to a reward model's score (set by the reward stage's
    /// `normalize`); absent for other models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_offset: Option<f64>,
}

fn default_max_positions() -> usize {
    2048
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_architectures() -> Vec<String> {
    vec!["LlamaForCausalLM".into()]
}
fn default_model_type() -> String {
    "llama".into()
}

impl LlamaConfig {
    /// A small model with the given widths and the usual defaults.
    pub fn tiny(
        vocab_size: usize,
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
    ) -> LlamaConfig {
        LlamaConfig {
            vocab_size,
            hidden_size: hidden,
            intermediate_size: hidden * 8 / 3,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads),
            max_position_embeddings: 512,
            rope_theta: default_rope_theta(),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            architectures: default_architectures(),
            model_type: default_model_type(),
            reward_offset: None,
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Shape checks a checkpoint's config must pass: `Err(message)`.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_type != "llama"
            || !self
                .architectures
                .iter()
                .any(|a| a == "LlamaForCausalLM" || a == "LlamaModel")
        {
            return Err(format!(
                "not a Llama model (model_type `{}`, architectures {:?}): posttrain loads LlamaForCausalLM checkpoints",
                self.model_type, self.architectures
            ));
        }
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
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
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
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "the head size {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Parameters in the model (with the LM head unless tied).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let kv = self.kv_heads() * self.head_dim();
        let layer = 2 * h + h * h * 2 + 2 * h * kv + 3 * h * i;
        v * h
            + self.num_hidden_layers * layer
            + h
            + if self.tie_word_embeddings { 0 } else { v * h }
    }
}
