//! RLHF with PPO, as InstructGPT and TRL run it. Four models: the policy
//! (trained), a frozen reference, a frozen reward model, and a value model
//! initialised from the reward model (a separate network rather than a
//! head on the policy, as InstructGPT did: the value function starts from
//! a model that already reads responses, and its updates cannot disturb
//! the policy).
//!
//! Each iteration:
//! 1. sample `batch_size` prompts and a response to each from the policy;
//! 2. score prompt + response with the reward model (optionally clipped);
//!    per-token reward `-kl_coef (log pi - log ref)` with the score added
//!    at the last token (optionally whitened);
//! 3. GAE advantages and returns from the value model's estimates; the
//!    advantages are whitened over the batch;
//! 4. `epochs` passes over the rollouts in `minibatches`: the clipped
//!    surrogate for the policy (plus `ptx_coef` times the language-model
//!    loss on pre-training data: PPO-ptx) and the clipped value loss;
//! 5. the adaptive KL controller (Ziegler et al. 2019) moves `kl_coef`
//!    toward `target_kl`, when one is set.
//!
//! Logged per iteration (names as in TRL where it has one): `score`,
//! `kl_k1` and `kl_k3` (per-sequence sums of each estimator: k1 is the one
//! in the reward), `kl_coef`, `reward` (score - kl_coef * kl_k1), `entropy`
//! (per token), `clip_frac`, `approx_kl` (of the update, mean
//! 0.5 (log pi - log pi_old)^2), `policy_loss`, `value_loss`,
//! `response_length`, `finished` (share that ended with the end token).

use std::path::Path;
use std::time::Instant;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::causal_lm::{batch_of, LmExamples};
use super::losses::lm_loss;
use super::metrics::MetricsLog;
use super::optim::{AdamW, TrainSettings};
use super::preference::{gae, kl_k1, kl_k3, ppo_policy_loss, ppo_value_loss};
use super::resume::{Checkpoints, LoopState, Restore, Trained};
use super::rollout::{self, gather_rows, logprobs_and_entropy, pick, sub_batch, Samples};
use super::{clipped_step, gradients, TrainError};
use crate::data::rng::Rng;
use crate::model::generate::SampleSettings;
use crate::model::llama::{reward_scores, scalar_values, TokenBatch};
use crate::model::{checkpoint, workers, Dev, LlamaParams};
use crate::stages::Metrics;

/// PPO's settings besides the optimizer's.
#[derive(Debug, Clone)]
pub struct PpoConfig {
    pub kl_coef: f64,
    /// Adaptive KL: the per-sequence KL to aim for (None = fixed `kl_coef`).
    pub target_kl: Option<f64>,
    pub horizon: f64,
    pub clip_range: f64,
    pub clip_range_value: f64,
    pub gamma: f64,
    pub lam: f64,
    pub epochs: usize,
    pub minibatches: usize,
    pub score_clip: Option<f64>,
    pub whiten_rewards: bool,
    pub ptx_coef: f64,
    pub sampling: SampleSettings,
    pub pad: usize,
    /// Tokens that end a response (trained on, as sampled).
    pub stops: Vec<usize>,
}

/// The model folders PPO starts from.
pub struct PpoModels<'a> {
    pub policy: &'a Path,
    pub reference: &'a Path,
    pub reward: &'a Path,
}

/// One iteration's samples and everything measured on them at sampling
/// time. Per-row vectors hold one value per response token.
struct Rollouts {
    batch: TokenBatch,
    /// Index of each response token in the flattened (B * S) batch, minus
    /// one: the column whose prediction is that token.
    columns: Vec<Vec<usize>>,
    old_logp: Vec<Vec<f32>>,
    ref_logp: Vec<Vec<f32>>,
    old_values: Vec<Vec<f32>>,
    advantages: Vec<Vec<f32>>,
    returns: Vec<Vec<f32>>,
    scores: Vec<f32>,
    entropy: f64,
    finished: f64,
}

/// Whiten values to mean 0 and variance 1 over all tokens of the batch.
fn whiten(rows: &mut [Vec<f32>], shift_mean: bool) {
    let all: Vec<f64> = rows.iter().flatten().map(|x| f64::from(*x)).collect();
    if all.len() < 2 {
        return;
    }
    let mean = all.iter().sum::<f64>() / all.len() as f64;
    let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (all.len() - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for x in rows.iter_mut().flatten() {
        let centred = f64::from(*x) - mean;
        *x = if shift_mean {
            (centred * scale) as f32
        } else {
            (centred * scale + mean) as f32
        };
    }
}

#[allow(clippy::too_many_arguments)]
fn rollout(
    policy: &LlamaParams<f32, Dev>,
    reference: &LlamaParams<f32, Dev>,
    reward: &LlamaParams<f32, Dev>,
    value: &LlamaParams<f32, Dev>,
    prompts: Vec<Vec<usize>>,
    cfg: &PpoConfig,
    kl_coef: f64,
    seed: u64,
) -> Rollouts {
    let Samples {
        batch,
        columns,
        finished,
    } = rollout::sample(policy, &prompts, &cfg.stops, cfg.pad, &cfg.sampling, seed);

    // The four models' passes, two at a time.
    let ((logp, entropy), (ref_flat, _)) = workers::join(
        || logprobs_and_entropy(policy, &batch),
        || logprobs_and_entropy(reference, &batch),
    );
    let (values_flat, mut scores) = workers::join(
        || scalar_values(value, &batch, NoneTape).as_vec(),
        || reward_scores(reward, &batch),
    );
    if let Some(c) = cfg.score_clip {
        scores
            .iter_mut()
            .for_each(|x| *x = x.clamp(-c as f32, c as f32));
    }
    let old_logp: Vec<Vec<f32>> = columns.iter().map(|c| pick(&logp, c)).collect();
    let ref_logp: Vec<Vec<f32>> = columns.iter().map(|c| pick(&ref_flat, c)).collect();
    let old_values: Vec<Vec<f32>> = columns.iter().map(|c| pick(&values_flat, c)).collect();

    let mut rewards: Vec<Vec<f32>> = old_logp
        .iter()
        .zip(&ref_logp)
        .zip(&scores)
        .map(|((lp, rl), score)| {
            let mut r: Vec<f32> = kl_k1(lp, rl)
                .iter()
                .map(|k| (-kl_coef * f64::from(*k)) as f32)
                .collect();
            *r.last_mut().expect("every response has a token") += score;
            r
        })
        .collect();
    if cfg.whiten_rewards {
        whiten(&mut rewards, false);
    }
    let (mut advantages, returns): (Vec<Vec<f32>>, Vec<Vec<f32>>) = rewards
        .iter()
        .zip(&old_values)
        .map(|(r, v)| gae(r, v, cfg.gamma, cfg.lam))
        .unzip();
    whiten(&mut advantages, true);

    let tokens: usize = columns.iter().map(Vec::len).sum();
    let entropy_sum: f64 = columns
        .iter()
        .flat_map(|c| pick(&entropy, c))
        .map(f64::from)
        .sum();
    Rollouts {
        batch,
        columns,
        old_logp,
        ref_logp,
        old_values,
        advantages,
        returns,
        scores,
        entropy: entropy_sum / tokens.max(1) as f64,
        finished: finished.iter().filter(|f| **f).count() as f64 / finished.len().max(1) as f64,
    }
}

#[allow(clippy::too_many_arguments)]
/// Train the policy with PPO; writes the policy's model folder into `out`,
/// the value model into `out/value/`, and `metrics.parquet`.
pub fn train(
    models: &PpoModels,
    prompts: &[Vec<usize>],
    ptx: Option<&LmExamples>,
    cfg: &PpoConfig,
    s: &TrainSettings,
    seed: u64,
    out: &Path,
    ckpt: &Checkpoints,
    progress: &ProgressBar,
) -> Result<Metrics, TrainError> {
    let dev = Dev::default();
    let mut policy = checkpoint::load(models.policy, &dev)?;
    if let Some((lora, seed)) = &s.lora {
        policy.attach_lora(lora, *seed);
    }
    // With LoRA and the policy's own start as the reference, the reference
    // is the policy with its adapters off: the same tensors, no copy.
    let reference = if policy.has_lora() && models.reference == models.policy {
        policy.without_lora()
    } else {
        checkpoint::load(models.reference, &dev)?
    };
    let reward = checkpoint::load(models.reward, &dev)?;
    let mut value = reward.clone();
    // The value model starts from the reward model's weights; its head is
    // not a reward, so the reward's normalisation does not apply to it.
    value.config.reward_offset = None;
    let mut policy_opt = AdamW::new(&policy);
    let mut value_opt = AdamW::new(&value);
    let columns = [
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "score",
        "reward",
        "kl_k1",
        "kl_k3",
        "kl_coef",
        "entropy",
        "clip_frac",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "ptx_loss",
        "response_length",
        "finished",
    ];
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 10);
    let mut rng = Rng::fork(seed, "ppo-prompts");
    let mut order: Vec<usize> = Vec::new();
    let mut kl_coef = cfg.kl_coef;
    progress.set_length(s.steps as u64);
    let mut start = 0;
    let restore = &mut [
        Restore {
            name: "policy",
            params: &mut policy,
            opt: &mut policy_opt,
        },
        Restore {
            name: "value",
            params: &mut value,
            opt: &mut value_opt,
        },
    ];
    if let Some(resumed) = ckpt.load(restore, &mut log)? {
        start = resumed.step;
        let st = &resumed.state;
        rng = Rng::from_state(st.ints["rng"]);
        order = st.lists["order"].iter().map(|i| *i as usize).collect();
        kl_coef = st.float("kl_coef").unwrap_or(kl_coef);
        progress.set_position(start as u64);
    }
    for it in start..s.steps {
        let clock = Instant::now();
        let lr = s.lr_at(it);
        // Prompts without replacement, reshuffled each pass.
        let mut rows = Vec::with_capacity(s.batch_size);
        while rows.len() < s.batch_size {
            if order.is_empty() {
                order = (0..prompts.len()).collect();
                rng.shuffle(&mut order);
            }
            rows.push(order.pop().expect("non-empty"));
        }
        let batch_prompts: Vec<Vec<usize>> = rows.iter().map(|r| prompts[*r].clone()).collect();
        let roll = rollout(
            &policy,
            &reference,
            &reward,
            &value,
            batch_prompts,
            cfg,
            kl_coef,
            seed ^ (it as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );

        let (mut clipped, mut tokens_seen) = (0.0f64, 0usize);
        let (mut approx_kl, mut policy_loss, mut value_loss, mut ptx_loss) =
            (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let (mut grad_norm, mut updates) = (0.0f64, 0usize);
        let mb = s.batch_size.div_ceil(cfg.minibatches.max(1));
        for _ in 0..cfg.epochs {
            let mut idx: Vec<usize> = (0..s.batch_size).collect();
            rng.shuffle(&mut idx);
            for chunk in idx.chunks(mb) {
                let (batch, cols) = sub_batch(&roll.batch, &roll.columns, chunk);
                let index = dev.tensor_from_vec(cols.clone(), (cols.len(),));
                let old = gather_rows(chunk, &roll.old_logp);
                let adv = gather_rows(chunk, &roll.advantages);

                let ptx_rows: Option<Vec<usize>> = match (ptx, cfg.ptx_coef > 0.0) {
                    (Some(data), true) => {
                        Some((0..chunk.len()).map(|_| rng.below(data.len())).collect())
                    }
                    _ => None,
                };
                let old_values = gather_rows(chunk, &roll.old_values);
                let returns = gather_rows(chunk, &roll.returns);
                // The policy's and the value model's passes run at once.
                let (policy_part, value_part) = workers::join(
                    || {
                        // Policy: clipped surrogate (+ PPO-ptx).
                        let lp = crate::model::llama::token_logprobs(
                            &policy,
                            &batch,
                            OwnedTape::default(),
                        )
                        .reshape_like(&(batch.batch * batch.seq,))
                        .gather(index.clone());
                        let now = lp.as_vec();
                        let mut loss = ppo_policy_loss(lp, &old, &adv, cfg.clip_range);
                        let pg = f64::from(loss.as_vec()[0]);
                        let mut lm_value = 0.0;
                        if let (Some(data), Some(rows)) = (ptx, &ptx_rows) {
                            let (pb, w) = batch_of(data, rows, cfg.pad);
                            let lm = lm_loss(&policy, &pb, &w, OwnedTape::default());
                            lm_value = f64::from(lm.as_vec()[0]);
                            loss = loss + lm * cfg.ptx_coef as f32;
                        }
                        (gradients(&policy, loss), now, pg, lm_value)
                    },
                    || {
                        // Value model: clipped value loss toward the returns.
                        let v = scalar_values(&value, &batch, OwnedTape::default())
                            .reshape_like(&(batch.batch * batch.seq,))
                            .gather(index.clone());
                        let vl = ppo_value_loss(v, &old_values, &returns, cfg.clip_range_value);
                        let value_loss = f64::from(vl.as_vec()[0]);
                        (gradients(&value, vl), value_loss)
                    },
                );
                let (g, now, pg, lm_value) = policy_part;
                for (n, o) in now.iter().zip(&old) {
                    let ratio = f64::from(n - o).exp();
                    clipped += f64::from(u8::from((ratio - 1.0).abs() > cfg.clip_range));
                    approx_kl += 0.5 * f64::from(n - o).powi(2);
                }
                tokens_seen += now.len();
                policy_loss += pg;
                ptx_loss += lm_value;
                grad_norm += clipped_step(&mut policy_opt, &mut policy, g, lr, s, it)?;
                let (g, vl) = value_part;
                value_loss += vl;
                clipped_step(&mut value_opt, &mut value, g, lr, s, it)?;
                updates += 1;
            }
        }

        // Statistics of the rollouts (what the KL controller sees: k1).
        let n = s.batch_size as f64;
        let sum = |v: Vec<f32>| v.into_iter().map(f64::from).sum::<f64>();
        let (kl1, kl3) = roll
            .old_logp
            .iter()
            .zip(&roll.ref_logp)
            .fold((0.0, 0.0), |(a, b), (p, r)| {
                (a + sum(kl_k1(p, r)) / n, b + sum(kl_k3(p, r)) / n)
            });
        let score = roll.scores.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let length = roll.columns.iter().map(Vec::len).sum::<usize>() as f64 / n;
        let u = updates.max(1) as f64;
        let secs = clock.elapsed().as_secs_f64();
        let trained_tokens = tokens_seen;
        let mut row = vec![
            ("loss", (policy_loss + value_loss) / u),
            ("lr", lr),
            ("grad_norm", grad_norm / u),
            ("tokens_per_s", trained_tokens as f64 / secs.max(1e-9)),
            ("score", score),
            ("reward", score - kl_coef * kl1),
            ("kl_k1", kl1),
            ("kl_k3", kl3),
            ("kl_coef", kl_coef),
            ("entropy", roll.entropy),
            ("clip_frac", clipped / tokens_seen.max(1) as f64),
            ("approx_kl", approx_kl / tokens_seen.max(1) as f64),
            ("policy_loss", policy_loss / u),
            ("value_loss", value_loss / u),
            ("response_length", length),
            ("finished", roll.finished),
        ];
        if ptx.is_some() {
            row.push(("ptx_loss", ptx_loss / u));
        }
        log.log(it + 1, &row)?;
        if !(score.is_finite() && kl1.is_finite()) {
            return Err(TrainError::NonFinite {
                step: it,
                what: "rollout score or KL",
                value: if score.is_finite() { kl1 } else { score },
            });
        }
        if let Some(target) = cfg.target_kl {
            kl_coef = adaptive_kl(kl_coef, kl1, target, s.batch_size, cfg.horizon);
        }
        if ckpt.due(it + 1, s) {
            let mut st = LoopState::default();
            st.ints.insert("rng".into(), rng.state());
            st.lists
                .insert("order".into(), order.iter().map(|i| *i as u64).collect());
            st.set_float("kl_coef", kl_coef);
            let models = [
                Trained {
                    name: "policy",
                    params: &policy,
                    opt: &policy_opt,
                },
                Trained {
                    name: "value",
                    params: &value,
                    opt: &value_opt,
                },
            ];
            ckpt.save(it + 1, &models, &st, &log)?;
        }
        progress.set_position(it as u64 + 1);
        progress.set_message(format!("score {score:.3} kl {kl1:.3}"));
    }
    checkpoint::save(&value, &out.join("value"))?;
    super::finish(&policy, log, out)
}

/// Ziegler et al.'s proportional controller:
/// `e = clip(kl / target - 1, -0.2, 0.2)`, `beta <- beta (1 + e n / horizon)`.
pub fn adaptive_kl(beta: f64, kl: f64, target: f64, n: usize, horizon: f64) -> f64 {
    let e = (kl / target - 1.0).clamp(-0.2, 0.2);
    beta * (1.0 + e * n as f64 / horizon)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_kl_moves_toward_the_target_and_is_clipped() {
        // kl above target by 50% -> e clipped to 0.2: beta * (1 + 0.2 * 100 / 1000)
        assert!((adaptive_kl(0.1, 9.0, 6.0, 100, 1000.0) - 0.102).abs() < 1e-12);
        // kl below target by 10%: e = -0.1
        assert!((adaptive_kl(0.1, 5.4, 6.0, 100, 1000.0) - 0.099).abs() < 1e-12);
        assert_eq!(adaptive_kl(0.1, 6.0, 6.0, 100, 1000.0), 0.1);
    }

    #[test]
    fn whitening_gives_zero_mean_unit_variance() {
        let mut rows = vec![vec![1.0f32, 2.0], vec![3.0, 4.0, 5.0]];
        whiten(&mut rows, true);
        let all: Vec<f64> = rows.iter().flatten().map(|x| f64::from(*x)).collect();
        let mean = all.iter().sum::<f64>() / 5.0;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 4.0;
        assert!(
            mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
            "{mean} {var}"
        );
        // Without the shift the mean is kept.
        let mut rows = vec![vec![1.0f32, 2.0, 3.0]];
        whiten(&mut rows, false);
        let m: f32 = rows[0].iter().sum::<f32>() / 3.0;
        assert!((m - 2.0).abs() < 1e-6);
    }

    #[test]
    fn rollout_columns_point_at_the_response_tokens() {
        let mut cfg = crate::model::LlamaConfig::tiny(17, 16, 1, 2, 2);
        cfg.intermediate_size = 16;
        let dev = Dev::default();
        let policy = LlamaParams::<f32, Dev>::init(&cfg, false, 1, &dev);
        let critic = LlamaParams::<f32, Dev>::init(&cfg, true, 2, &dev);
        let ppo = PpoConfig {
            kl_coef: 0.1,
            target_kl: None,
            horizon: 1000.0,
            clip_range: 0.2,
            clip_range_value: 0.2,
            gamma: 1.0,
            lam: 1.0,
            epochs: 1,
            minibatches: 1,
            score_clip: None,
            whiten_rewards: false,
            ptx_coef: 0.0,
            sampling: SampleSettings {
                max_new_tokens: 5,
                ..SampleSettings::default()
            },
            pad: 0,
            stops: vec![16],
        };
        let prompts = vec![vec![3, 4, 5], vec![6]];
        let r = rollout(
            &policy,
            &policy,
            &critic,
            &critic,
            prompts.clone(),
            &ppo,
            0.1,
            7,
        );
        let s = r.batch.seq;
        for (b, p) in prompts.iter().enumerate() {
            let cols = &r.columns[b];
            assert!(!cols.is_empty() && cols.len() <= 6);
            // The first response token is predicted at the prompt's last column.
            assert_eq!(cols[0], b * s + p.len() - 1);
            // Policy == reference: KL is 0 and each row's GAE return sums the score.
            assert!(kl_k1(&r.old_logp[b], &r.ref_logp[b])
                .iter()
                .all(|k| k.abs() < 1e-6));
            assert_eq!(r.advantages[b].len(), cols.len());
            // gamma = lambda = 1: the first return is the sum of the rewards.
            assert!(
                (r.returns[b][0] - r.scores[b]).abs() < 1e-4,
                "{r:?}",
                r = r.returns[b]
            );
        }
        // The sub-batch of row 1 alone points at the same tokens.
        let (one, cols) = sub_batch(&r.batch, &r.columns, &[1]);
        assert_eq!(one.batch, 1);
        let shift = s;
        assert_eq!(
            cols,
            r.columns[1].iter().map(|c| c - shift).collect::<Vec<_>>()
        );
    }
}
