//! The Llama-family decoder's forward pass in dfdx, as Hugging Face's
//! `LlamaForCausalLM` (and its relatives Mistral, Qwen2, Qwen3: biases and
//! per-head q/k norms switched by the config) computes it: token
//! embedding; per layer RMSNorm -> grouped-query causal self-attention
//! with rotary embeddings (the `rotate_half` convention: the two halves of
//! each head; frequencies by the config's RoPE type) -> residual ->
//! RMSNorm -> SwiGLU MLP -> residual; final RMSNorm; LM head. Padding is
//! masked out of the keys, and positions count real tokens only, so left
//! and right padding give the same numbers as the unpadded sequence.
//!
//! dfdx pitfalls avoided here (see shared/notes/dfdx-0.13.md): no `slice`
//! (its CPU backward overwrites): `rotate_half` is a matmul with a fixed
//! signed permutation; masks use a large finite negative, not -inf; a
//! tensor used twice is `retaped` for its second use, never combined with
//! itself in one op.

use dfdx::prelude::*;

use super::kernels::Kernels;
use super::params::{Layer, LlamaParams, Matrix};

/// Token ids of a batch, row-major (batch, seq), and which are real tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<usize>,
    pub mask: Vec<bool>,
    pub batch: usize,
    pub seq: usize,
}

impl TokenBatch {
    /// Sequences padded on the right with `pad` to the longest.
    pub fn right_padded(rows: &[Vec<usize>], pad: usize) -> TokenBatch {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend(r.iter().copied().chain(std::iter::repeat(pad)).take(seq));
            mask.extend((0..seq).map(|i| i < r.len()));
        }
        TokenBatch {
            ids,
            mask,
            batch: rows.len(),
            seq,
        }
    }

    /// Sequences padded on the left (for generation: all rows end together).
    pub fn left_padded(rows: &[Vec<usize>], pad: usize) -> TokenBatch {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            let fill = seq - r.len();
            ids.extend(std::iter::repeat_n(pad, fill).chain(r.iter().copied()));
            mask.extend((0..seq).map(|i| i >= fill));
        }
        TokenBatch {
            ids,
            mask,
            batch: rows.len(),
            seq,
        }
    }

    /// Position of each token: the number of real tokens before it in its row.
    pub fn positions(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.ids.len());
        for row in self.mask.chunks(self.seq) {
            let mut n = 0;
            for m in row {
                out.push(n);
                n += usize::from(*m);
            }
        }
        out
    }

    /// Index of each row's last real token.
    pub fn last_real(&self) -> Vec<usize> {
        self.mask
            .chunks(self.seq)
            .map(|row| row.iter().rposition(|m| *m).unwrap_or(0))
            .collect()
    }
}

pub type T3<E, D, T> = Tensor<(usize, usize, usize), E, D, T>;
pub type T2<E, D, T> = Tensor<(usize, usize), E, D, T>;

/// Constants shared by all layers of one forward pass.
pub struct Rope<E: Dtype, D: Storage<E>> {
    /// (batch, query, head_dim)
    pub(crate) cos: Tensor<(usize, usize, usize), E, D>,
    pub(crate) sin: Tensor<(usize, usize, usize), E, D>,
    /// (head_dim, head_dim): x @ rotate == rotate_half(x)
    pub(crate) rotate: Tensor<(usize, usize), E, D>,
    /// (batch, query, key): 0 where the query may see the key, else -1e9
    pub(crate) bias: Tensor<(usize, usize, usize), E, D>,
}

const MASKED: f32 = -1e9;

impl<E: Dtype + From<f32>, D: Device<E>> Rope<E, D> {
    /// Constants for a whole batch: causal attention over real tokens.
    pub(crate) fn new(params: &LlamaParams<E, D>, batch: &TokenBatch, dev: &D) -> Self {
        let (b, s) = (batch.batch, batch.seq);
        let mut visible = Vec::with_capacity(b * s * s);
        for row in 0..b {
            for i in 0..s {
                for j in 0..s {
                    visible.push(j <= i && batch.mask[row * s + j]);
                }
            }
        }
        Self::from_parts(params, b, s, &batch.positions(), &visible, s, dev)
    }

    /// Constants for `sq` new query tokens per row at `positions` (b * sq)
    /// attending to `sk` keys, `visible[(row * sq + i) * sk + j]`.
    pub(crate) fn from_parts(
        params: &LlamaParams<E, D>,
        b: usize,
        sq: usize,
        positions: &[usize],
        visible: &[bool],
        sk: usize,
        dev: &D,
    ) -> Self {
        let cfg = &params.config;
        let hd = cfg.head_dim();
        let half = hd / 2;
        let inv_freq = cfg.rope.inv_freq(hd);
        let (mut cos, mut sin) = (
            Vec::with_capacity(b * sq * hd),
            Vec::with_capacity(b * sq * hd),
        );
        for pos in positions {
            for j in 0..hd {
                let angle = *pos as f64 * inv_freq[j % half];
                cos.push(E::from(angle.cos() as f32));
                sin.push(E::from(angle.sin() as f32));
            }
        }
        let mut rotate = vec![E::from(0.0); hd * hd];
        for j in 0..half {
            rotate[(j + half) * hd + j] = E::from(-1.0);
            rotate[j * hd + j + half] = E::from(1.0);
        }
        let bias = visible
            .iter()
            .map(|v| E::from(if *v { 0.0 } else { MASKED }))
            .collect();
        Rope {
            cos: dev.tensor_from_vec(cos, (b, sq, hd)),
            sin: dev.tensor_from_vec(sin, (b, sq, hd)),
            rotate: dev.tensor_from_vec(rotate, (hd, hd)),
            bias: dev.tensor_from_vec(bias, (b, sq, sk)),
        }
    }
}

/// x (B, S, K) @ w^T for a weight w (N, K) that trains: (B, S, N).
pub(crate) fn linear<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T>>(
    x: T3<E, D, T>,
    w: &Matrix<E, D>,
) -> T3<E, D, T> {
    D::linear(x, w, false)
}

/// x @ w^T + b for a bias b (1, N) when the layer has one; `frozen`: no
/// gradient for w and b.
fn linear_bias<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T>>(
    x: T3<E, D, T>,
    w: &Matrix<E, D>,
    b: Option<&Matrix<E, D>>,
    frozen: bool,
) -> T3<E, D, T> {
    let y = D::linear(x, w, frozen);
    match b {
        None => y,
        Some(b) => {
            let shape = *y.shape();
            let b = b.clone().reshape_like(&(shape.2,));
            if frozen {
                y + b.broadcast_like::<_, Axes2<0, 1>>(&shape)
            } else {
                y + b.retaped::<T>().broadcast_like::<_, Axes2<0, 1>>(&shape)
            }
        }
    }
}

/// A layer's projection `target` (weight `w`, bias `b`) of x, plus its LoRA
/// update (alpha / r) (x A^T) B^T when the layer has an adapter for it.
fn project<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T>>(
    x: T3<E, D, T>,
    layer: &Layer<E, D>,
    target: &str,
    w: &Matrix<E, D>,
    b: Option<&Matrix<E, D>>,
) -> T3<E, D, T> {
    let adapter = layer
        .lora
        .as_ref()
        .and_then(|l| l.adapters.get(target).map(|ab| (l.scale, l.dropout, ab)));
    // With adapters anywhere in the layer its base weights are frozen.
    let frozen = layer.lora.is_some();
    match adapter {
        None => linear_bias(x, w, b, frozen),
        Some((scale, dropout, (a, bm))) => {
            let y = linear_bias(x.retaped::<T>(), w, b, frozen);
            // LoRA dropout on the adapter's input (see lora::dropout).
            let x = match super::lora::dropout::next_key(dropout) {
                None => x,
                Some(key) => {
                    let shape = *x.shape();
                    let mask = super::lora::dropout::mask::<E>(key, dropout, shape.num_elements());
                    let mask = x.device().tensor_from_vec(mask, shape);
                    x * mask
                }
            };
            let low = linear(linear(x, a), bm);
            y + low * E::from(scale as f32)
        }
    }
}

/// Qwen3's RMSNorm over each head of q or k (B, S, heads, hd), before RoPE.
fn head_norm<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T>>(
    x: Tensor<(usize, usize, usize, usize), E, D, T>,
    w: Option<&Matrix<E, D>>,
    eps: f64,
) -> Tensor<(usize, usize, usize, usize), E, D, T> {
    match w {
        None => x,
        Some(w) => {
            let shape = *x.shape();
            let (b, s, n, hd) = shape;
            D::rms_norm(x.reshape_like(&(b, s * n, hd)), w, eps).reshape_like(&shape)
        }
    }
}

/// Queries, keys and values of a layer with rotary embeddings applied,
/// laid out (B, S, heads, hd) and (B, S, kv_heads, hd).
pub(crate) type Qkv<E, D, T> = (
    Tensor<(usize, usize, usize, usize), E, D, T>,
    Tensor<(usize, usize, usize, usize), E, D, T>,
    Tensor<(usize, usize, usize, usize), E, D, T>,
);

pub(crate) fn project_qkv<
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
>(
    x: T3<E, D, T>,
    layer: &Layer<E, D>,
    params: &LlamaParams<E, D>,
    c: &Rope<E, D>,
) -> Qkv<E, D, T> {
    let cfg = &params.config;
    let (b, s, _) = *x.shape();
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
    let eps = cfg.rms_norm_eps;
    let q = project(
        x.retaped::<T>(),
        layer,
        "q_proj",
        &layer.q_proj,
        layer.q_bias.as_ref(),
    )
    .reshape_like(&(b, s, nh, hd));
    let k = project(
        x.retaped::<T>(),
        layer,
        "k_proj",
        &layer.k_proj,
        layer.k_bias.as_ref(),
    )
    .reshape_like(&(b, s, nkv, hd));
    let v = project(x, layer, "v_proj", &layer.v_proj, layer.v_bias.as_ref())
        .reshape_like(&(b, s, nkv, hd));
    let q = head_norm(q, layer.q_norm.as_ref(), eps);
    let k = head_norm(k, layer.k_norm.as_ref(), eps);
    (D::rope(q, c), D::rope(k, c), v)
}

/// Attention of queries (B, Sq, nh, hd) over keys and values (B, Sk, nkv, hd)
/// with the bias in `c`, then the output projection: (B, Sq, H).
pub(crate) fn attend<
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
>(
    (q, k, v): Qkv<E, D, T>,
    layer: &Layer<E, D>,
    params: &LlamaParams<E, D>,
    c: &Rope<E, D>,
) -> T3<E, D, T> {
    let (b, sq, nh, hd) = *q.shape();
    let (nkv, sk) = (params.config.kv_heads(), k.shape().1);
    let group = nh / nkv;
    // Query head h uses key/value head h / group (HF's repeat_kv order), so
    // the `group` query heads of one key/value head are stacked along the
    // query axis: keys and values (the whole cache, when generating) are
    // used in place instead of being copied `group` times.
    let q = q
        .permute::<_, Axes4<0, 2, 1, 3>>() // (B, nh, Sq, hd)
        .reshape_like(&(b, nkv, group * sq, hd));
    let k = k.permute::<_, Axes4<0, 2, 3, 1>>(); // (B, nkv, hd, Sk)
    let v = v.permute::<_, Axes4<0, 2, 1, 3>>(); // (B, nkv, Sk, hd)
    let scores = q.matmul(k).reshape_like(&(b, nh, sq, sk));
    let probs = D::masked_softmax(scores, 1.0 / (hd as f64).sqrt(), c).reshape_like(&(
        b,
        nkv,
        group * sq,
        sk,
    ));
    let out = probs
        .matmul(v) // (B, nkv, group * Sq, hd) = (B, nh, Sq, hd)
        .reshape_like(&(b, nh, sq, hd))
        .permute::<_, Axes4<0, 2, 1, 3>>()
        .reshape_like(&(b, sq, nh * hd));
    project(out, layer, "o_proj", &layer.o_proj, layer.o_bias.as_ref())
}

fn attention<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T> + Merge<NoneTape>>(
    x: T3<E, D, T>,
    layer: &Layer<E, D>,
    params: &LlamaParams<E, D>,
    c: &Rope<E, D>,
) -> T3<E, D, T> {
    attend(project_qkv(x, layer, params, c), layer, params, c)
}

pub(crate) fn mlp<E: Dtype + From<f32>, D: Kernels<E>, T: Tape<E, D> + Merge<T>>(
    x: T3<E, D, T>,
    layer: &Layer<E, D>,
) -> T3<E, D, T> {
    let gate = project(
        x.retaped::<T>(),
        layer,
        "gate_proj",
        &layer.gate_proj,
        layer.gate_bias.as_ref(),
    );
    let up = project(x, layer, "up_proj", &layer.up_proj, layer.up_bias.as_ref());
    project(
        D::swiglu(gate, up),
        layer,
        "down_proj",
        &layer.down_proj,
        layer.down_bias.as_ref(),
    )
}

/// The final hidden states (after the last RMSNorm): (B, S, H).
pub fn hidden_states<E, D, T>(
    params: &LlamaParams<E, D>,
    batch: &TokenBatch,
    tape: T,
) -> T3<E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let dev = params.embed_tokens.device().clone();
    let consts = Rope::new(params, batch, &dev);
    let ids = dev.tensor_from_vec(batch.ids.clone(), (batch.batch, batch.seq));
    // A LoRA model's embeddings are frozen: the tape starts after them.
    let x: T3<E, D, T> = if params.has_lora() {
        params.embed_tokens.clone().gather(ids).put_tape(tape)
    } else {
        params.embed_tokens.clone().put_tape(tape).gather(ids)
    };
    D::decoder(x, params, &consts)
}

/// Every layer, then the final RMSNorm, op by op: [`Kernels::decoder`]
/// on devices without a fused stack.
pub(crate) fn decoder_layers<E, D, T>(
    mut x: T3<E, D, T>,
    params: &LlamaParams<E, D>,
    consts: &Rope<E, D>,
) -> T3<E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let eps = params.config.rms_norm_eps;
    for layer in &params.layers {
        let normed = D::rms_norm(x.retaped::<T>(), &layer.input_layernorm, eps);
        x = x + attention(normed, layer, params, consts);
        let normed = D::rms_norm(x.retaped::<T>(), &layer.post_attention_layernorm, eps);
        x = x + mlp(normed, layer);
    }
    D::rms_norm(x, &params.norm, eps)
}

/// Next-token logits (B, S, vocab).
pub fn logits<E, D, T>(params: &LlamaParams<E, D>, batch: &TokenBatch, tape: T) -> T3<E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let h = hidden_states(params, batch, tape);
    let head = params.lm_head.as_ref().unwrap_or(&params.embed_tokens);
    D::linear(h, head, params.has_lora())
}

/// log p(ids[t+1] | ids[..=t]) at column t: (B, S). The last column has
/// no next token, and columns whose next token is padding are meaningless:
/// callers weight them 0.
pub fn token_logprobs<E, D, T>(
    params: &LlamaParams<E, D>,
    batch: &TokenBatch,
    tape: T,
) -> T2<E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let (b, s) = (batch.batch, batch.seq);
    let mut targets = Vec::with_capacity(b * s);
    for row in batch.ids.chunks(s) {
        targets.extend(row[1..].iter().copied());
        targets.push(row[s - 1]);
    }
    let h = hidden_states(params, batch, tape);
    let head = params.lm_head.as_ref().unwrap_or(&params.embed_tokens);
    D::lm_head_logprobs(h, head, params.has_lora(), &targets)
}

/// The scalar head at every position (B, S): reward or value model output.
pub fn scalar_values<E, D, T>(
    params: &LlamaParams<E, D>,
    batch: &TokenBatch,
    tape: T,
) -> T2<E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let score = params.score.as_ref().expect("model has a score head");
    let h = hidden_states(params, batch, tape);
    let (b, s, _) = *h.shape();
    linear(h, score).reshape_like(&(b, s))
}

/// The scalar head at each row's last real token (B,).
pub fn scalar_at_last<E, D, T>(
    params: &LlamaParams<E, D>,
    batch: &TokenBatch,
    tape: T,
) -> Tensor<(usize,), E, D, T>
where
    E: Dtype + From<f32>,
    D: Kernels<E>,
    T: Tape<E, D> + Merge<T> + Merge<NoneTape>,
{
    let dev = params.embed_tokens.device().clone();
    let last = dev.tensor_from_vec(batch.last_real(), (batch.batch,));
    scalar_values(params, batch, tape).select(last)
}

/// A reward model's scores (B,): the scalar head at each row's last real
/// token plus the model's `reward_offset` (its normalisation), as every
/// user of a trained reward model reads them.
pub fn reward_scores<D: Kernels<f32>>(
    params: &LlamaParams<f32, D>,
    batch: &TokenBatch,
) -> Vec<f32> {
    let offset = params.config.reward_offset.unwrap_or(0.0) as f32;
    scalar_at_last(params, batch, NoneTape)
        .as_vec()
        .into_iter()
        .map(|x| x + offset)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    type P = LlamaParams<f64, Cpu>;

    pub(crate) fn config(tied: bool) -> LlamaConfig {
        let mut cfg = LlamaConfig::tiny(11, 8, 2, 4, 2);
        cfg.intermediate_size = 12;
        cfg.tie_word_embeddings = tied;
        cfg
    }

    fn model(tied: bool) -> P {
        model_of(&config(tied))
    }

    fn model_of(cfg: &LlamaConfig) -> P {
        model_scaled(cfg, 1.0)
    }

    /// Weights `scale` times the 0.02 init: larger scores, so a bias on
    /// queries (which only shifts scores by its dot product with the keys'
    /// differences) gets a gradient well above the check's floor.
    pub(crate) fn model_scaled(cfg: &LlamaConfig, scale: f64) -> P {
        let dev = Cpu::default();
        let mut p = P::init(cfg, true, 3, &dev);
        for (name, t) in p.named_mut() {
            if !super::super::params::is_vector(&name) {
                let v: Vec<f64> = t.as_vec().iter().map(|x| x * scale).collect();
                t.copy_from(&v);
            }
        }
        // Norm weights away from 1 and biases away from 0 so their
        // gradients are exercised.
        for (name, t) in p.named_mut() {
            if super::super::params::is_vector(&name) {
                let v: Vec<f64> = t
                    .as_vec()
                    .iter()
                    .enumerate()
                    .map(|(i, x)| x + 0.1 * (i % 3) as f64 - 0.05)
                    .collect();
                t.copy_from(&v);
            }
        }
        p
    }

    fn batch() -> TokenBatch {
        TokenBatch::right_padded(&[vec![1, 4, 2, 7, 3], vec![5, 9, 2]], 0)
    }

    /// A scalar touching every parameter: weighted log-probs plus weighted
    /// scalar-head outputs at the last real token.
    fn loss<T: Tape<f64, Cpu> + Merge<T> + Merge<NoneTape> + Default>(
        p: &P,
        b: &TokenBatch,
        tape: T,
    ) -> Tensor<(), f64, Cpu, T> {
        let dev = Cpu::default();
        let (rows, s) = (b.batch, b.seq);
        let w: Vec<f64> = (0..rows * s)
            .map(|i| {
                let (r, t) = (i / s, i % s);
                let real_target = t + 1 < s && b.mask[r * s + t + 1];
                if real_target {
                    0.3 + 0.1 * (i % 4) as f64
                } else {
                    0.0
                }
            })
            .collect();
        let w = dev.tensor_from_vec(w, (rows, s));
        let u = dev.tensor_from_vec(vec![0.7, -1.3], (rows,));
        let lp = token_logprobs(p, b, tape) * w;
        let sc = scalar_at_last(p, b, T::default()) * u;
        lp.sum() + sc.sum()
    }

    /// The loss without a tape, with the LoRA dropout masks of seed 3
    /// (the same masks at every call; no effect without dropout).
    fn value(p: &P, b: &TokenBatch) -> f64 {
        crate::model::lora::dropout::scoped(3, || loss(p, b, NoneTape).array())
    }

    fn check_gradients(tied: bool) {
        check_gradients_of(&config(tied));
    }

    fn check_gradients_of(cfg: &LlamaConfig) {
        check_gradients_scaled(cfg, 1.0);
    }

    fn check_gradients_scaled(cfg: &LlamaConfig, scale: f64) {
        let p = model_scaled(cfg, scale);
        let b = batch();
        let tape: OwnedTape<f64, Cpu> = Default::default();
        let l = loss(&p, &b, tape);
        let grads = l.backward();
        check_trainable(&p, &b, &grads);
    }

    /// Every trained parameter's gradient against central differences
    /// (with LoRA: the adapters; else every parameter).
    fn check_trainable(p: &P, b: &TokenBatch, grads: &Gradients<f64, Cpu>) {
        let h = 1e-6;
        for (name, t) in p.trainable() {
            let g = grads.get(t).as_vec();
            let n = g.len();
            // The largest gradient (never a vacuous check) and two fixed entries.
            let largest = (0..n)
                .max_by(|a, b| g[*a].abs().total_cmp(&g[*b].abs()))
                .unwrap();
            assert!(g[largest].abs() > 1e-6, "{name} has no gradient");
            for k in [largest, n / 2, n - 1] {
                let mut plus = p.clone();
                let mut minus = p.clone();
                for (q, sign) in [(&mut plus, 1.0), (&mut minus, -1.0)] {
                    let target = q
                        .trainable_mut()
                        .into_iter()
                        .find(|(m, _)| *m == name)
                        .unwrap()
                        .1;
                    let mut v = target.as_vec();
                    v[k] += sign * h;
                    target.copy_from(&v);
                }
                let fd = (value(&plus, b) - value(&minus, b)) / (2.0 * h);
                let err = (fd - g[k]).abs() / (fd.abs() + g[k].abs()).max(1e-8);
                assert!(
                    err < 1e-5 || (fd - g[k]).abs() < 1e-9,
                    "{name}[{k}]: analytic {} vs finite difference {fd}",
                    g[k]
                );
            }
        }
    }

    #[test]
    fn lora_gradients_match_finite_differences() {
        // Every target on a model with biases, B away from zero.
        let mut cfg = config(false);
        cfg.attention_bias = true;
        cfg.mlp_bias = true;
        let mut p = model_of(&cfg);
        crate::model::lora::tests::attach_every_target(&mut p);
        let b = batch();
        let tape: OwnedTape<f64, Cpu> = Default::default();
        let grads = loss(&p, &b, tape).backward();
        assert_eq!(p.trainable().len(), 2 * 7 * cfg.num_hidden_layers + 1);
        check_trainable(&p, &b, &grads);
    }

    #[test]
    fn lora_gradients_with_dropout_match_finite_differences() {
        let mut p = model_of(&config(false));
        crate::model::lora::tests::attach_every_target(&mut p);
        let b = batch();
        let without = value(&p, &b);
        crate::model::lora::tests::set_dropout(&mut p, 0.3);
        assert!(
            (value(&p, &b) - without).abs() > 1e-9,
            "the masks change the loss"
        );
        let tape: OwnedTape<f64, Cpu> = Default::default();
        let grads = crate::model::lora::dropout::scoped(3, || loss(&p, &b, tape)).backward();
        check_trainable(&p, &b, &grads);
    }

    #[test]
    fn gradients_match_finite_differences_gqa_untied() {
        check_gradients(false);
    }

    #[test]
    fn gradients_match_finite_differences_tied() {
        check_gradients(true);
    }

    #[test]
    fn gradients_match_finite_differences_llama_biases_and_llama3_rope() {
        check_gradients_scaled(&with_biases_and_llama3_rope(config(false)), 10.0);
    }

    /// Attention and MLP biases, and Llama-3 RoPE with all three bands at
    /// head_dim 4.
    pub(crate) fn with_biases_and_llama3_rope(mut cfg: LlamaConfig) -> LlamaConfig {
        cfg.attention_bias = true;
        cfg.mlp_bias = true;
        cfg.rope = crate::model::config::RopeParameters {
            rope_theta: 100.0,
            rope_type: crate::model::config::RopeType::Llama3 {
                factor: 4.0,
                low_freq_factor: 1.0,
                high_freq_factor: 2.0,
                original_max_position_embeddings: 8.0,
            },
        };
        cfg
    }

    #[test]
    fn gradients_match_finite_differences_qwen2_qkv_biases() {
        let mut cfg = config(true);
        cfg.architecture = crate::model::config::Architecture::Qwen2;
        let p = model_of(&cfg);
        assert!(p.layers[0].q_bias.is_some() && p.layers[0].o_bias.is_none());
        check_gradients_scaled(&cfg, 10.0);
    }

    #[test]
    fn gradients_match_finite_differences_qwen3_qk_norm_and_head_dim() {
        let mut cfg = config(false);
        cfg.architecture = crate::model::config::Architecture::Qwen3;
        // Wider heads than hidden / heads, as Qwen3 has.
        cfg.head_dim = Some(4);
        cfg.rope = crate::model::config::RopeParameters {
            rope_theta: 50.0,
            rope_type: crate::model::config::RopeType::Linear { factor: 2.0 },
        };
        let p = model_of(&cfg);
        assert!(p.layers[0].q_norm.is_some() && p.layers[0].q_bias.is_none());
        check_gradients_scaled(&cfg, 10.0);
    }

    #[test]
    fn padding_on_either_side_gives_the_unpadded_numbers() {
        let p = model(false);
        let alone = TokenBatch::right_padded(&[vec![5, 9, 2]], 0);
        let right = TokenBatch::right_padded(&[vec![1, 4, 2, 7, 3], vec![5, 9, 2]], 0);
        let left = TokenBatch::left_padded(&[vec![1, 4, 2, 7, 3], vec![5, 9, 2]], 0);
        let a = logits(&p, &alone, NoneTape).as_vec();
        let r = logits(&p, &right, NoneTape).as_vec();
        let l = logits(&p, &left, NoneTape).as_vec();
        let v = 11;
        // Row 1's three real tokens: right-padded at 0..3, left-padded at 2..5.
        let row_r = &r[5 * v..5 * v + 3 * v];
        let row_l = &l[5 * v + 2 * v..5 * v + 5 * v];
        for ((x, y), z) in a.iter().zip(row_r).zip(row_l) {
            assert!(
                (x - y).abs() < 1e-10 && (x - z).abs() < 1e-10,
                "{x} {y} {z}"
            );
        }
    }
}
