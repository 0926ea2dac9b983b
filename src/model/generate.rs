//! Sampling from a Llama: batched prompts (left-padded), a key-value cache
//! so each new token costs one position's work, temperature, top-k, top-p,
//! a stop token, and a seeded generator.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use super::kernels::Kernels;
use super::llama::{attend, linear, logits, mlp, project_qkv, Rope, TokenBatch};
use super::{Dev, LlamaParams};
use crate::data::rng::Rng;

/// How to pick tokens (the `sampling` settings of stages and the CLI).
/// Range-checked as it is read ([`SampleSettings::check`]), so a stage's
/// table and the CLI's flags obey the same rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "SampleFields")]
pub struct SampleSettings {
    /// 0 picks the most likely token (greedy). Default 1.0.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0 = all). Default 0.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1 = all). Default 1.0.
    pub top_p: f64,
    /// Default 48.
    pub max_new_tokens: usize,
}

/// The TOML table as written, before [`SampleSettings::check`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SampleFields {
    temperature: f64,
    top_k: usize,
    top_p: f64,
    max_new_tokens: usize,
}

impl Default for SampleFields {
    fn default() -> Self {
        let d = SampleSettings::default();
        SampleFields {
            temperature: d.temperature,
            top_k: d.top_k,
            top_p: d.top_p,
            max_new_tokens: d.max_new_tokens,
        }
    }
}

impl TryFrom<SampleFields> for SampleSettings {
    type Error = String;
    fn try_from(f: SampleFields) -> Result<Self, String> {
        let s = SampleSettings {
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
            max_new_tokens: f.max_new_tokens,
        };
        s.check()?;
        Ok(s)
    }
}

impl SampleSettings {
    /// `temperature` finite and >= 0 (0 = greedy), `top_p` in (0, 1],
    /// `max_new_tokens` >= 1. A NaN temperature would otherwise pick the
    /// least likely token every time, and a negative one turn greedy.
    pub fn check(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "`temperature` must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!(
                "`top_p` must be in (0, 1] (1 = off), got {}",
                self.top_p
            ));
        }
        if self.max_new_tokens == 0 {
            return Err("`max_new_tokens` must be at least 1".to_string());
        }
        Ok(())
    }
}

impl Default for SampleSettings {
    fn default() -> Self {
        SampleSettings {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_new_tokens: 48,
        }
    }
}

type T4 = Tensor<(usize, usize, usize, usize), f32, Dev>;

/// Keys and values of every layer so far, (B, T, kv_heads, head_dim).
struct KvCache {
    keys: Vec<Option<T4>>,
    values: Vec<Option<T4>>,
}

fn append(slot: &mut Option<T4>, new: T4) -> T4 {
    let all = match slot.take() {
        None => new,
        Some(prev) => (prev, new).concat_along(Axis::<1>),
    };
    *slot = Some(all.clone());
    all
}

/// Run `n` new tokens per row through the model with the cache; return the
/// logits after each row's last new token, (B, V) as rows.
fn step(
    params: &LlamaParams<f32, Dev>,
    cache: &mut KvCache,
    ids: Vec<usize>,
    n: usize,
    positions: &[usize],
    visible: &[bool],
    total_keys: usize,
) -> Vec<Vec<f32>> {
    let dev = params.embed_tokens.device().clone();
    let b = ids.len() / n;
    let consts = Rope::from_parts(params, b, n, positions, visible, total_keys, &dev);
    let eps = params.config.rms_norm_eps;
    let ids = dev.tensor_from_vec(ids, (b, n));
    let mut x: Tensor<(usize, usize, usize), f32, Dev> = params.embed_tokens.clone().gather(ids);
    for (l, layer) in params.layers.iter().enumerate() {
        let normed = Dev::rms_norm(x.clone(), &layer.input_layernorm, eps);
        let (q, k, v) = project_qkv(normed, layer, params, &consts);
        let k = append(&mut cache.keys[l], k);
        let v = append(&mut cache.values[l], v);
        x = x.clone() + attend((q, k, v), layer, params, &consts);
        let normed = Dev::rms_norm(x.clone(), &layer.post_attention_layernorm, eps);
        x = x.clone() + mlp(normed, layer);
    }
    let h = Dev::rms_norm(x, &params.norm, eps);
    let last = dev.tensor_from_vec(vec![n - 1; b], (b,));
    let h: Tensor<(usize, usize), f32, Dev> = h.select(last);
    let (bb, hh) = *h.shape();
    let out = linear(
        h.reshape_like(&(bb, 1, hh)),
        params.lm_head.as_ref().unwrap_or(&params.embed_tokens),
    );
    let v = params.config.vocab_size;
    out.as_vec().chunks(v).map(<[f32]>::to_vec).collect()
}

/// Pick a token from logits.
pub fn sample_token(logits: &[f32], s: &SampleSettings, rng: &mut Rng) -> usize {
    if s.temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(i, _)| i);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b)));
    if s.top_k > 0 {
        order.truncate(s.top_k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|i| ((logits[*i] as f64 - max) / s.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut cum = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cum += p;
                cum >= s.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.uniform();
    for (i, p) in order.iter().zip(&probs) {
        if u < *p {
            return *i;
        }
        u -= p;
    }
    *order.last().expect("at least one token")
}

/// Continue each prompt until one of `stops` (included at the end, so the
/// answer is as sampled) or `max_new_tokens` other tokens. With
/// `use_cache = false` every step recomputes the whole sequence (the
/// reference the cache is tested against).
pub fn generate(
    params: &LlamaParams<f32, Dev>,
    prompts: &[Vec<usize>],
    stops: &[usize],
    pad: usize,
    s: &SampleSettings,
    seed: u64,
    use_cache: bool,
) -> Vec<Vec<usize>> {
    Dev::with_weights_cached(params, || {
        generate_with(params, prompts, stops, pad, s, seed, use_cache)
    })
}

fn generate_with(
    params: &LlamaParams<f32, Dev>,
    prompts: &[Vec<usize>],
    stops: &[usize],
    pad: usize,
    s: &SampleSettings,
    seed: u64,
    use_cache: bool,
) -> Vec<Vec<usize>> {
    let b = prompts.len();
    if b == 0 {
        return Vec::new();
    }
    let mut rng = Rng::fork(seed, "sample");
    let start = TokenBatch::left_padded(prompts, pad);
    let p = start.seq;
    let mut rows: Vec<Vec<usize>> = start.ids.chunks(p).map(<[usize]>::to_vec).collect();
    let mut masks: Vec<Vec<bool>> = start.mask.chunks(p).map(<[bool]>::to_vec).collect();
    let mut next_pos: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut cache = KvCache {
        keys: vec![None; params.layers.len()],
        values: vec![None; params.layers.len()],
    };
    let full_logits = |rows: &[Vec<usize>], masks: &[Vec<bool>]| -> Vec<Vec<f32>> {
        let s = rows[0].len();
        let batch = TokenBatch {
            ids: rows.concat(),
            mask: masks.concat(),
            batch: rows.len(),
            seq: s,
        };
        let v = params.config.vocab_size;
        let all = logits(params, &batch, NoneTape).as_vec();
        (0..rows.len())
            .map(|r| all[(r * s + s - 1) * v..(r * s + s) * v].to_vec())
            .collect()
    };
    let mut last = if use_cache {
        let mut visible = Vec::with_capacity(b * p * p);
        for m in &masks {
            for i in 0..p {
                visible.extend((0..p).map(|j| j <= i && m[j]));
            }
        }
        step(
            params,
            &mut cache,
            start.ids.clone(),
            p,
            &start.positions(),
            &visible,
            p,
        )
    } else {
        full_logits(&rows, &masks)
    };
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    let mut ended: Vec<Option<usize>> = vec![None; b];
    for _ in 0..s.max_new_tokens {
        let mut new_ids = Vec::with_capacity(b);
        for r in 0..b {
            if !done[r] {
                let t = sample_token(&last[r], s, &mut rng);
                if stops.contains(&t) {
                    done[r] = true;
                    ended[r] = Some(t);
                } else {
                    out[r].push(t);
                }
            }
            new_ids.push(if done[r] {
                pad
            } else {
                *out[r].last().expect("pushed")
            });
        }
        if done.iter().all(|d| *d) || out.iter().all(|o| o.len() >= s.max_new_tokens) {
            break;
        }
        for r in 0..b {
            rows[r].push(new_ids[r]);
            masks[r].push(!done[r]);
        }
        let total = rows[0].len();
        last = if use_cache {
            let visible: Vec<bool> = masks.iter().flat_map(|m| m.iter().copied()).collect();
            step(params, &mut cache, new_ids, 1, &next_pos, &visible, total)
        } else {
            full_logits(&rows, &masks)
        };
        for r in 0..b {
            next_pos[r] += usize::from(!done[r]);
        }
    }
    for (o, e) in out.iter_mut().zip(ended) {
        o.extend(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    fn model() -> LlamaParams<f32, Dev> {
        let mut cfg = LlamaConfig::tiny(23, 16, 2, 4, 2);
        cfg.intermediate_size = 24;
        let mut p = LlamaParams::<f32, Dev>::init(&cfg, false, 5, &Dev::default());
        // Larger weights: sharper distributions, so greedy choices are not near-ties.
        for (_, t) in p.named_mut() {
            let v: Vec<f32> = t.as_vec().iter().map(|x| x * 20.0 + 0.0).collect();
            t.copy_from(&v);
        }
        p
    }

    #[test]
    fn cached_generation_equals_full_recomputation_token_for_token() {
        let p = model();
        let prompts = vec![vec![3, 7, 1, 9, 4], vec![2, 8], vec![5, 5, 6]];
        let greedy = SampleSettings {
            temperature: 0.0,
            max_new_tokens: 12,
            ..SampleSettings::default()
        };
        let cached = generate(&p, &prompts, &[22], 0, &greedy, 0, true);
        let full = generate(&p, &prompts, &[22], 0, &greedy, 0, false);
        assert_eq!(cached, full);
        assert!(cached.iter().any(|o| o.len() > 3), "{cached:?}");
        // Alone or in a batch: the same continuation.
        let alone = generate(&p, &prompts[1..2], &[22], 0, &greedy, 0, true);
        assert_eq!(alone[0], cached[1]);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let p = model();
        let prompts = vec![vec![1, 2, 3]];
        let s = SampleSettings {
            temperature: 1.0,
            top_k: 2,
            max_new_tokens: 10,
            ..SampleSettings::default()
        };
        let a = generate(&p, &prompts, &[], 0, &s, 7, true);
        assert_eq!(a, generate(&p, &prompts, &[], 0, &s, 7, true));
        let mut rng = Rng::new(1);
        let logits = [0.0, 5.0, 4.0, 1.0];
        for _ in 0..200 {
            let t = sample_token(&logits, &s, &mut rng);
            assert!(t == 1 || t == 2, "top-2 keeps tokens 1 and 2, got {t}");
        }
        let nucleus = SampleSettings {
            top_p: 0.5,
            ..s.clone()
        };
        for _ in 0..50 {
            assert_eq!(
                sample_token(&logits, &nucleus, &mut rng),
                1,
                "p(1) = 0.72 > 0.5 alone"
            );
        }
    }
}
