//! The Llama's parameters as plain runtime-shaped tensors, named as in a
//! Hugging Face checkpoint. dfdx's `TensorCollection` cannot hold runtime
//! shapes, so visiting (names, optimizer updates, checkpoints) is by hand.
//! Every parameter is a matrix; the norms' weights are stored as (1, H) and
//! converted to the checkpoint's (H,) at save and load.

use dfdx::prelude::*;

use super::config::LlamaConfig;
use crate::data::rng::Rng;

pub type Matrix<E, D> = Tensor<(usize, usize), E, D>;

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer<E: Dtype, D: Storage<E>> {
    pub input_layernorm: Matrix<E, D>,
    /// (heads * head_dim, hidden)
    pub q_proj: Matrix<E, D>,
    /// (kv_heads * head_dim, hidden)
    pub k_proj: Matrix<E, D>,
    pub v_proj: Matrix<E, D>,
    /// (hidden, heads * head_dim)
    pub o_proj: Matrix<E, D>,
    pub post_attention_layernorm: Matrix<E, D>,
    /// (intermediate, hidden)
    pub gate_proj: Matrix<E, D>,
    pub up_proj: Matrix<E, D>,
    /// (hidden, intermediate)
    pub down_proj: Matrix<E, D>,
}

/// A Llama decoder with an LM head (unless tied) and an optional scalar
/// head `score` (reward and value models).
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

/// Hugging Face tensor name and expected shape of every parameter.
pub fn expected_shapes(cfg: &LlamaConfig, with_score: bool) -> Vec<(String, (usize, usize))> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.kv_heads() * cfg.head_dim();
    let mut out = vec![("model.embed_tokens.weight".to_string(), (v, h))];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), (1, h)),
            (format!("{p}.self_attn.q_proj.weight"), (q, h)),
            (format!("{p}.self_attn.k_proj.weight"), (kv, h)),
            (format!("{p}.self_attn.v_proj.weight"), (kv, h)),
            (format!("{p}.self_attn.o_proj.weight"), (h, q)),
            (format!("{p}.post_attention_layernorm.weight"), (1, h)),
            (format!("{p}.mlp.gate_proj.weight"), (i, h)),
            (format!("{p}.mlp.up_proj.weight"), (i, h)),
            (format!("{p}.mlp.down_proj.weight"), (h, i)),
        ]);
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

/// Whether a parameter is a norm weight (stored (1, H), saved as (H,)).
pub fn is_norm(name: &str) -> bool {
    name.ends_with("layernorm.weight") || name == "model.norm.weight"
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
            .map(|_| Layer {
                input_layernorm: it.next().expect("tensor"),
                q_proj: it.next().expect("tensor"),
                k_proj: it.next().expect("tensor"),
                v_proj: it.next().expect("tensor"),
                o_proj: it.next().expect("tensor"),
                post_attention_layernorm: it.next().expect("tensor"),
                gate_proj: it.next().expect("tensor"),
                up_proj: it.next().expect("tensor"),
                down_proj: it.next().expect("tensor"),
            })
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
    /// N(0, 0.02), norm weights 1; deterministic from the seed on any device.
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
            refs.extend([
                &l.input_layernorm,
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.post_attention_layernorm,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]);
        }
        refs.push(&self.norm);
        refs.extend(self.lm_head.as_ref());
        refs.extend(self.score.as_ref());
        names.into_iter().map(|(n, _)| n).zip(refs).collect()
    }

    /// Mutable access to every parameter, same order as [`Self::named`].
    pub fn named_mut(&mut self) -> Vec<(String, &mut Matrix<E, D>)> {
        let names = expected_shapes(&self.config, self.score.is_some());
        let mut refs: Vec<&mut Matrix<E, D>> = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            refs.extend([
                &mut l.input_layernorm,
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.post_attention_layernorm,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ]);
        }
        refs.push(&mut self.norm);
        refs.extend(self.lm_head.as_mut());
        refs.extend(self.score.as_mut());
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
