//! The Llama's parameters as plain runtime-shaped tensors, named as in a
//! Hugging Face checkpoint. dfdx's `TensorCollection` cannot hold runtime
//! shapes, so visiting (names, optimizer updates, checkpoints) is by hand.
//! Every parameter is a matrix; the norms' weights are stored as (1, H) and
//! converted to the checkpoint's (H,) at save and load.

use dfdx::prelude::*;

use super::config::LlamaConfig;
use crate::data::rng::Rng;

pub type Matrix<E, D> = Tensor<(usize, usize), E, D>;

/// One decoder layer. Biases and the q/k norms exist only where the
/// config's architecture has them (see [`LlamaConfig`]).
#[derive(Debug, Clone)]
pub struct Layer<E: Dtype, D: Storage<E>> {
    pub input_layernorm: Matrix<E, D>,
    /// (heads * head_dim, hidden)
    pub q_proj: Matrix<E, D>,
    /// (1, heads * head_dim)
    pub q_bias: Option<Matrix<E, D>>,
    /// (kv_heads * head_dim, hidden)
    pub k_proj: Matrix<E, D>,
    /// (1, kv_heads * head_dim)
    pub k_bias: Option<Matrix<E, D>>,
    pub v_proj: Matrix<E, D>,
    pub v_bias: Option<Matrix<E, D>>,
    /// (1, head_dim): Qwen3's per-head RMSNorm of queries and keys.
    pub q_norm: Option<Matrix<E, D>>,
    pub k_norm: Option<Matrix<E, D>>,
    /// (hidden, heads * head_dim)
    pub o_proj: Matrix<E, D>,
    /// (1, hidden)
    pub o_bias: Option<Matrix<E, D>>,
    pub post_attention_layernorm: Matrix<E, D>,
    /// (intermediate, hidden)
    pub gate_proj: Matrix<E, D>,
    pub gate_bias: Option<Matrix<E, D>>,
    pub up_proj: Matrix<E, D>,
    pub up_bias: Option<Matrix<E, D>>,
    /// (hidden, intermediate)
    pub down_proj: Matrix<E, D>,
    pub down_bias: Option<Matrix<E, D>>,
    /// LoRA adapters of this layer's projections (see `model::lora`).
    pub lora: Option<Box<super::lora::LayerLora<E, D>>>,
}

/// A Llama-family decoder with an LM head (unless tied) and an optional
/// scalar head `score` (reward and value models).
#[derive(Debug, Clone)]
pub struct LlamaParams<E: Dtype, D: Storage<E>> {
    pub config: LlamaConfig,
    /// (vocab, hidden)
    pub embed_tokens: Matrix<E, D>,
    pub layers: Vec<Layer<E, D>>,
    /// (1, hidden)
    pub norm: Matrix<E, D>,
    /// (vocab, hidden); `None` when tied to `embed_tokens`.
    pub lm_head: Option<Matrix<E, D>>,
    /// (1, hidden)
    pub score: Option<Matrix<E, D>>,
}

/// The tensors of one layer in checkpoint order: (suffix, shape, present).
fn layer_slots(cfg: &LlamaConfig) -> [(&'static str, (usize, usize), bool); 18] {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let hd = cfg.head_dim();
    let q = cfg.num_attention_heads * hd;
    let kv = cfg.kv_heads() * hd;
    let (qkv_b, o_b, mlp_b, qk_n) = (
        cfg.qkv_bias(),
        cfg.o_bias(),
        cfg.mlp_biases(),
        cfg.qk_norm(),
    );
    [
        ("input_layernorm.weight", (1, h), true),
        ("self_attn.q_proj.weight", (q, h), true),
        ("self_attn.q_proj.bias", (1, q), qkv_b),
        ("self_attn.k_proj.weight", (kv, h), true),
        ("self_attn.k_proj.bias", (1, kv), qkv_b),
        ("self_attn.v_proj.weight", (kv, h), true),
        ("self_attn.v_proj.bias", (1, kv), qkv_b),
        ("self_attn.q_norm.weight", (1, hd), qk_n),
        ("self_attn.k_norm.weight", (1, hd), qk_n),
        ("self_attn.o_proj.weight", (h, q), true),
        ("self_attn.o_proj.bias", (1, h), o_b),
        ("post_attention_layernorm.weight", (1, h), true),
        ("mlp.gate_proj.weight", (i, h), true),
        ("mlp.gate_proj.bias", (1, i), mlp_b),
        ("mlp.up_proj.weight", (i, h), true),
        ("mlp.up_proj.bias", (1, i), mlp_b),
        ("mlp.down_proj.weight", (h, i), true),
        ("mlp.down_proj.bias", (1, h), mlp_b),
    ]
}

impl<E: Dtype, D: Storage<E>> Layer<E, D> {
    /// Every slot in [`layer_slots`] order, `None` where absent.
    fn slots(&self) -> [Option<&Matrix<E, D>>; 18] {
        [
            Some(&self.input_layernorm),
            Some(&self.q_proj),
            self.q_bias.as_ref(),
            Some(&self.k_proj),
            self.k_bias.as_ref(),
            Some(&self.v_proj),
            self.v_bias.as_ref(),
            self.q_norm.as_ref(),
            self.k_norm.as_ref(),
            Some(&self.o_proj),
            self.o_bias.as_ref(),
            Some(&self.post_attention_layernorm),
            Some(&self.gate_proj),
            self.gate_bias.as_ref(),
            Some(&self.up_proj),
            self.up_bias.as_ref(),
            Some(&self.down_proj),
            self.down_bias.as_ref(),
        ]
    }

    fn slots_mut(&mut self) -> [Option<&mut Matrix<E, D>>; 18] {
        [
            Some(&mut self.input_layernorm),
            Some(&mut self.q_proj),
            self.q_bias.as_mut(),
            Some(&mut self.k_proj),
            self.k_bias.as_mut(),
            Some(&mut self.v_proj),
            self.v_bias.as_mut(),
            self.q_norm.as_mut(),
            self.k_norm.as_mut(),
            Some(&mut self.o_proj),
            self.o_bias.as_mut(),
            Some(&mut self.post_attention_layernorm),
            Some(&mut self.gate_proj),
            self.gate_bias.as_mut(),
            Some(&mut self.up_proj),
            self.up_bias.as_mut(),
            Some(&mut self.down_proj),
            self.down_bias.as_mut(),
        ]
    }

    /// A layer from its present tensors in slot order.
    fn from_slots(cfg: &LlamaConfig, it: &mut impl Iterator<Item = Matrix<E, D>>) -> Self {
        let slots = layer_slots(cfg);
        let mut take = |k: usize| slots[k].2.then(|| it.next().expect("tensor"));
        let mut t: Vec<Option<Matrix<E, D>>> = (0..slots.len()).map(&mut take).collect();
        let mut required = |k: usize| t[k].take().expect("a layer's weight is always present");
        let (input_layernorm, q_proj, k_proj, v_proj, o_proj) = (
            required(0),
            required(1),
            required(3),
            required(5),
            required(9),
        );
        let (post_attention_layernorm, gate_proj, up_proj, down_proj) =
            (required(11), required(12), required(14), required(16));
        Layer {
            input_layernorm,
            q_proj,
            q_bias: t[2].take(),
            k_proj,
            k_bias: t[4].take(),
            v_proj,
            v_bias: t[6].take(),
            q_norm: t[7].take(),
            k_norm: t[8].take(),
            o_proj,
            o_bias: t[10].take(),
            post_attention_layernorm,
            gate_proj,
            gate_bias: t[13].take(),
            up_proj,
            up_bias: t[15].take(),
            down_proj,
            down_bias: t[17].take(),
            lora: None,
        }
    }
}

/// Hugging Face tensor name and expected shape of every parameter.
pub fn expected_shapes(cfg: &LlamaConfig, with_score: bool) -> Vec<(String, (usize, usize))> {
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    let mut out = vec![("model.embed_tokens.weight".to_string(), (v, h))];
    for l in 0..cfg.num_hidden_layers {
        for (suffix, shape, present) in layer_slots(cfg) {
            if present {
                out.push((format!("model.layers.{l}.{suffix}"), shape));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), (1, h)));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), (v, h)));
    }
    if with_score {
        out.push(("score.weight".to_string(), (1, h)));
    }
    out
}

/// Whether a parameter is a norm weight (starts at 1).
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

/// Whether a parameter is a vector (norm weight or bias): stored (1, N),
/// saved as (N,), and never weight-decayed.
pub fn is_vector(name: &str) -> bool {
    is_norm(name) || name.ends_with(".bias")
}

impl<E: Dtype, D: Device<E>> LlamaParams<E, D> {
    /// Build from named matrices in `expected_shapes` order.
    pub fn from_named(cfg: LlamaConfig, mut tensors: Vec<Matrix<E, D>>, with_score: bool) -> Self {
        let score = with_score.then(|| tensors.pop().expect("score"));
        let lm_head = (!cfg.tie_word_embeddings).then(|| tensors.pop().expect("lm_head"));
        let norm = tensors.pop().expect("norm");
        let mut it = tensors.into_iter();
        let embed_tokens = it.next().expect("embed");
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| Layer::from_slots(&cfg, &mut it))
            .collect();
        LlamaParams {
            config: cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
        }
    }

    /// Random initialisation as Hugging Face's Llama does it: weights
    /// N(0, 0.02), norm weights 1, biases 0; deterministic from the seed on
    /// any device.
    pub fn init(cfg: &LlamaConfig, with_score: bool, seed: u64, dev: &D) -> Self
    where
        E: From<f32>,
    {
        let mut rng = Rng::fork(seed, "llama-init");
        let tensors = expected_shapes(cfg, with_score)
            .into_iter()
            .map(|(name, (r, c))| {
                let values: Vec<E> = if is_norm(&name) {
                    vec![E::from(1.0); r * c]
                } else if name.ends_with(".bias") {
                    vec![E::from(0.0); r * c]
                } else {
                    (0..r * c)
                        .map(|_| E::from(0.02 * normal(&mut rng) as f32))
                        .collect()
                };
                dev.tensor_from_vec(values, (r, c))
            })
            .collect();
        Self::from_named(cfg.clone(), tensors, with_score)
    }

    /// Every parameter with its checkpoint name, in `expected_shapes` order.
    pub fn named(&self) -> Vec<(String, &Matrix<E, D>)> {
        let names = expected_shapes(&self.config, self.score.is_some());
        let mut refs: Vec<&Matrix<E, D>> = vec![&self.embed_tokens];
        for l in &self.layers {
            refs.extend(l.slots().into_iter().flatten());
        }
        refs.push(&self.norm);
        refs.extend(self.lm_head.as_ref());
        refs.extend(self.score.as_ref());
        debug_assert_eq!(names.len(), refs.len());
        names.into_iter().map(|(n, _)| n).zip(refs).collect()
    }

    /// Mutable access to every parameter, same order as [`Self::named`].
    pub fn named_mut(&mut self) -> Vec<(String, &mut Matrix<E, D>)> {
        let names = expected_shapes(&self.config, self.score.is_some());
        let mut refs: Vec<&mut Matrix<E, D>> = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            refs.extend(l.slots_mut().into_iter().flatten());
        }
        refs.push(&mut self.norm);
        refs.extend(self.lm_head.as_mut());
        refs.extend(self.score.as_mut());
        debug_assert_eq!(names.len(), refs.len());
        names.into_iter().map(|(n, _)| n).zip(refs).collect()
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut Rng) -> f64 {
    let u1 = rng.uniform().max(1e-12);
    let u2 = rng.uniform();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

impl<D: Device<f32>> LlamaParams<f32, D> {
    /// Grow the vocabulary to `vocab` rows. New rows of the embedding (and
    /// of an untied head) are the mean of the existing rows, as Hugging
    /// Face's `resize_token_embeddings` starts them: a new token begins as
    /// an average token, and existing tokens' outputs are unchanged.
    pub fn grow_vocab(&mut self, vocab: usize) {
        if vocab <= self.config.vocab_size {
            return;
        }
        let grow = |m: &Matrix<f32, D>| -> Matrix<f32, D> {
            let (rows, cols) = *m.shape();
            let mut values = m.as_vec();
            let mean: Vec<f32> = (0..cols)
                .map(|j| (0..rows).map(|i| values[i * cols + j]).sum::<f32>() / rows as f32)
                .collect();
            for _ in rows..vocab {
                values.extend_from_slice(&mean);
            }
            m.device().tensor_from_vec(values, (vocab, cols))
        };
        self.embed_tokens = grow(&self.embed_tokens);
        if let Some(head) = &self.lm_head {
            self.lm_head = Some(grow(head));
        }
        self.config.vocab_size = vocab;
    }
}
