//! Online RL without a value model, as TRL runs it: GRPO (DeepSeekMath,
//! DeepSeek-R1) and RLOO (Ahmadian et al. 2024). Each iteration samples a
//! group of responses per prompt from the policy (the shared
//! [`super::rollout`]), scores them (a reward model and/or rule-based
//! verifiers, weighted), turns the group's rewards into advantages and
//! takes `num_iterations` x `minibatches` clipped policy-gradient steps.
//!
//! - GRPO: `A = (r - mean_group r) / (std_group r + 1e-4)` (Bessel std;
//!   `scale_rewards` "group", "batch" or "none" = Dr. GRPO), the same for
//!   every token of a response; per token
//!   `-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta k3(ref, pi)`,
//!   aggregated by `loss_type` (see [`token_weights`]). beta defaults to 0
//!   (TRL's default: no reference model needed).
//! - RLOO: the k1 KL to the reference in the reward,
//!   `r' = r - beta sum_t (log pi_old - log ref)`, the leave-one-out
//!   baseline `b_i = (sum_j r'_j - r'_i) / (k - 1)`, `A = r' - b_i`, and a
//!   sequence-level ratio `exp(sum_t (log pi - log pi_old))`, PPO-clipped,
//!   averaged over sequences.
//!
//! Logged per iteration: `reward` and `reward_std` (over all samples),
//! `reward_model` and `verifier` (the two sources' means), `groups_equal`
//! (share of groups whose rewards are all equal: no signal), `kl` (k3 per
//! sequence, to the reference; only when one is loaded: `beta` > 0), `clip_low` / `clip_high` (share of tokens
//! clipped on each side), `response_length`, `entropy`, `finished`.

use std::path::Path;
use std::time::Instant;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::metrics::MetricsLog;
use super::optim::{AdamW, TrainSettings};
use super::preference::{kl_k1, kl_k3};
use super::resume::{Checkpoints, LoopState, Restore, Trained};
use super::rollout::{self, gather_rows, logprobs_and_entropy, pick, sub_batch};
use super::{clipped_step, gradients, TrainError};
use crate::data::rng::Rng;
use crate::model::generate::SampleSettings;
use crate::model::llama::{reward_scores, token_logprobs};
use crate::model::{checkpoint, workers, Dev};
use crate::stages::Metrics;

/// How GRPO scales group-centred rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    Group,
    Batch,
    None,
}

/// How GRPO's per-token losses are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// Mean over each sequence's tokens, then over sequences.
    Grpo,
    /// Sum over the minibatch's tokens / their count.
    Bnpo,
    /// Sum / (sequences x max_new_tokens).
    DrGrpo,
    /// Sum / the whole rollout batch's token count (TRL's default).
    Dapo,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimator {
    Grpo {
        scale_rewards: ScaleRewards,
        loss_type: LossType,
    },
    Rloo,
}

#[derive(Debug, Clone)]
pub struct GroupConfig {
    pub estimator: Estimator,
    /// Responses per prompt (G for GRPO, k for RLOO).
    pub group_size: usize,
    /// GRPO: k3 KL coefficient in the loss; RLOO: k1 KL in the reward.
    pub beta: f64,
    pub epsilon: f64,
    pub epsilon_high: f64,
    pub num_iterations: usize,
    pub minibatches: usize,
    /// Weight of the reward model's score in the reward (0 = unused).
    pub reward_model_weight: f64,
    pub sampling: SampleSettings,
    pub pad: usize,
    pub stops: Vec<usize>,
}

/// The models a group method starts from.
pub struct GroupModels<'a> {
    pub policy: &'a Path,
    /// Needed when `beta > 0`.
    pub reference: Option<&'a Path>,
    pub reward: Option<&'a Path>,
}

/// Rule-based rewards of sampled responses: given each sample's prompt
/// index and response tokens (stop token included when it finished), the
/// weighted sum of the stage's verifiers.
pub type Verifier<'a> = dyn Fn(&[usize], &[Vec<usize>]) -> Vec<f64> + Sync + 'a;

/// GRPO's advantages: rewards centred on their group's mean and scaled.
pub fn grpo_advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Vec<f64> {
    let std = |v: &[f64]| -> f64 {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let n = (v.len().max(2) - 1) as f64;
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt()
    };
    let batch_std = std(rewards);
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let div = match scale {
                ScaleRewards::Group => std(g) + 1e-4,
                ScaleRewards::Batch => batch_std + 1e-4,
                ScaleRewards::None => 1.0,
            };
            g.iter().map(move |r| (r - mean) / div).collect::<Vec<_>>()
        })
        .collect()
}

/// RLOO's advantages: each reward minus the mean of the others in its group.
pub fn rloo_advantages(rewards: &[f64], group: usize) -> Vec<f64> {
    rewards
        .chunks(group)
        .flat_map(|g| {
            let sum: f64 = g.iter().sum();
            let k = g.len() as f64;
            g.iter()
                .map(move |r| r - (sum - r) / (k - 1.0))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The weight of each token's loss in a minibatch so that the weighted sum
/// is `loss_type`'s aggregate: `lengths` are the minibatch's response
/// lengths, `batch_tokens` the whole rollout batch's token count and
/// `max_new` the longest response allowed.
pub fn token_weights(
    lengths: &[usize],
    loss_type: LossType,
    batch_tokens: usize,
    minibatches: usize,
    max_new: usize,
) -> Vec<f32> {
    let seqs = lengths.len() as f64;
    let tokens: usize = lengths.iter().sum();
    lengths
        .iter()
        .flat_map(|len| {
            let w = match loss_type {
                LossType::Grpo => 1.0 / (*len.max(&1) as f64 * seqs),
                LossType::Bnpo => 1.0 / tokens.max(1) as f64,
                LossType::DrGrpo => 1.0 / (seqs * max_new as f64),
                // Each minibatch carries its share of the global mean, so
                // an iteration's minibatch losses sum to the batch's.
                LossType::Dapo => minibatches as f64 / batch_tokens.max(1) as f64,
            };
            std::iter::repeat_n(w as f32, *len)
        })
        .collect()
}

type V<T> = Tensor<(usize,), f32, Dev, T>;

fn constant(v: &[f32]) -> V<NoneTape> {
    super::preference::constant(&Dev::default(), v)
}

/// GRPO's clipped surrogate plus `beta` k3 per token, weighted and summed.
pub fn grpo_loss<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    logp: V<T>,
    old: &[f32],
    reference: Option<&[f32]>,
    advantages: &[f32],
    weights: &[f32],
    cfg: &GroupConfig,
) -> Tensor<(), f32, Dev, T> {
    // The tensor holding the recorded tape must be the last one consumed
    // (a `retaped` copy starts an empty tape), so the log-ratio is kept
    // for the KL term when there is one.
    let diff = logp - constant(old);
    let kl_ref = reference.filter(|_| cfg.beta > 0.0);
    let (ratio, diff) = match kl_ref {
        Some(_) => (diff.retaped::<T>().exp(), Some(diff)),
        None => (diff.exp(), None),
    };
    let unclipped = ratio.retaped::<T>() * constant(advantages);
    let clipped = ratio.clamp(1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high) * constant(advantages);
    let mut per_token = unclipped.minimum(clipped).negate();
    if let (Some(r), Some(diff)) = (kl_ref, diff) {
        // k3 = exp(ref - lp) - (ref - lp) - 1, with ref - lp = (ref - old) - diff.
        let c: Vec<f32> = r.iter().zip(old).map(|(r, o)| r - o).collect();
        let e = diff.negate() + constant(&c);
        let k3 = e.retaped::<T>().exp() - e - 1.0;
        per_token = per_token + k3 * cfg.beta as f32;
    }
    (per_token * constant(weights)).sum()
}

/// RLOO's sequence-level clipped surrogate, averaged over sequences:
/// `lengths` split the flat token log-probs into sequences.
pub fn rloo_loss<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    logp: V<T>,
    old: &[f32],
    advantages: &[f32],
    lengths: &[usize],
    epsilon: f64,
) -> Tensor<(), f32, Dev, T> {
    let n = lengths.len();
    // A (sequences x tokens) 0/1 matrix sums each sequence's tokens.
    let tokens: usize = lengths.iter().sum();
    let mut membership = vec![0f32; n * tokens];
    let mut at = 0;
    for (i, len) in lengths.iter().enumerate() {
        for t in at..at + len {
            membership[i * tokens + t] = 1.0;
        }
        at += len;
    }
    // (tokens, sequences), the taped factor on the left (dfdx merges the
    // left operand's tape).
    let mut member_t = vec![0f32; tokens * n];
    for i in 0..n {
        for t in 0..tokens {
            member_t[t * n + i] = membership[i * tokens + t];
        }
    }
    let m = Dev::default().tensor_from_vec(member_t, (tokens, n));
    let diff = (logp - constant(old)).reshape_like(&(1, tokens));
    let seq = diff.matmul(m).reshape_like(&(n,));
    let ratio = seq.exp();
    let unclipped = ratio.retaped::<T>() * constant(advantages);
    let clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * constant(advantages);
    unclipped.minimum(clipped).negate().mean()
}

/// Train the policy; writes its model folder and `metrics.parquet` to `out`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    models: &GroupModels,
    prompts: &[Vec<usize>],
    verifier: &Verifier,
    cfg: &GroupConfig,
    s: &TrainSettings,
    seed: u64,
    out: &Path,
    ckpt: &Checkpoints,
    progress: &ProgressBar,
) -> Result<Metrics, TrainError> {
    let dev = Dev::default();
    let mut policy = checkpoint::load(models.policy, &dev)?;
    let reference = match models.reference {
        // The KL term is the reference's only use.
        Some(r) if cfg.beta > 0.0 => Some(checkpoint::load(r, &dev)?),
        _ => None,
    };
    let reward = match models.reward {
        Some(r) if cfg.reward_model_weight != 0.0 => Some(checkpoint::load(r, &dev)?),
        _ => None,
    };
    let mut opt = AdamW::new(&policy);
    let columns = [
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "reward",
        "reward_std",
        "reward_model",
        "verifier",
        "groups_equal",
        "kl",
        "clip_low",
        "clip_high",
        "entropy",
        "response_length",
        "finished",
    ];
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 10);
    let mut rng = Rng::fork(seed, "group-prompts");
    let mut order: Vec<usize> = Vec::new();
    let g = cfg.group_size;
    progress.set_length(s.steps as u64);
    let mut start = 0;
    let restore = &mut [Restore {
        name: "policy",
        params: &mut policy,
        opt: &mut opt,
    }];
    if let Some(resumed) = ckpt.load(restore, &mut log)? {
        start = resumed.step;
        rng = Rng::from_state(resumed.state.ints["rng"]);
        order = resumed.state.lists["order"]
            .iter()
            .map(|i| *i as usize)
            .collect();
        progress.set_position(start as u64);
    }
    for it in start..s.steps {
        let clock = Instant::now();
        let lr = s.lr_at(it);
        // Prompts without replacement, reshuffled each pass; each `g` times.
        let mut rows = Vec::with_capacity(s.batch_size);
        while rows.len() < s.batch_size {
            if order.is_empty() {
                order = (0..prompts.len()).collect();
                rng.shuffle(&mut order);
            }
            rows.push(order.pop().expect("non-empty"));
        }
        let owners: Vec<usize> = rows
            .iter()
            .flat_map(|r| std::iter::repeat_n(*r, g))
            .collect();
        let repeated: Vec<Vec<usize>> = owners.iter().map(|r| prompts[*r].clone()).collect();
        let iter_seed = seed ^ (it as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let samples = rollout::sample(
            &policy,
            &repeated,
            &cfg.stops,
            cfg.pad,
            &cfg.sampling,
            iter_seed,
        );
        let n = samples.columns.len();

        // Log-probs under the sampling policy and the reference, and the
        // reward model's scores, two passes at a time.
        let ((old_flat, entropy), (ref_flat, scores)) = workers::join(
            || logprobs_and_entropy(&policy, &samples.batch),
            || {
                let r = reference
                    .as_ref()
                    .map(|m| logprobs_and_entropy(m, &samples.batch).0);
                let sc = reward.as_ref().map(|m| reward_scores(m, &samples.batch));
                (r, sc)
            },
        );
        let old: Vec<Vec<f32>> = samples.columns.iter().map(|c| pick(&old_flat, c)).collect();
        let refs: Option<Vec<Vec<f32>>> = ref_flat
            .as_ref()
            .map(|f| samples.columns.iter().map(|c| pick(f, c)).collect());
        let responses: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                samples.columns[i]
                    .iter()
                    .map(|c| samples.batch.ids[c + 1])
                    .collect()
            })
            .collect();
        let verified = verifier(&owners, &responses);
        let rm: Vec<f64> = match &scores {
            Some(sc) => sc.iter().map(|x| f64::from(*x)).collect(),
            None => vec![0.0; n],
        };
        let mut rewards: Vec<f64> = verified
            .iter()
            .zip(&rm)
            .map(|(v, r)| v + cfg.reward_model_weight * r)
            .collect();
        // Per-sequence k1 (RLOO's reward) and k3 (logged) in one pass.
        let sum = |v: Vec<f32>| v.into_iter().map(f64::from).sum::<f64>();
        let (kl1, kl3): (Vec<f64>, Vec<f64>) = match &refs {
            Some(r) => old
                .iter()
                .zip(r)
                .map(|(p, q)| (sum(kl_k1(p, q)), sum(kl_k3(p, q))))
                .unzip(),
            None => (vec![0.0; n], vec![0.0; n]),
        };
        let raw_mean = rewards.iter().sum::<f64>() / n as f64;
        let raw_std = (rewards.iter().map(|r| (r - raw_mean).powi(2)).sum::<f64>()
            / (n.max(2) - 1) as f64)
            .sqrt();
        let groups_equal = rewards
            .chunks(g)
            .filter(|c| c.iter().all(|r| (r - c[0]).abs() < 1e-9))
            .count() as f64
            / rows.len() as f64;
        let advantages: Vec<f64> = match cfg.estimator {
            Estimator::Grpo { scale_rewards, .. } => grpo_advantages(&rewards, g, scale_rewards),
            Estimator::Rloo => {
                for (r, k) in rewards.iter_mut().zip(&kl1) {
                    *r -= cfg.beta * k;
                }
                rloo_advantages(&rewards, g)
            }
        };
        let batch_tokens: usize = samples.columns.iter().map(Vec::len).sum();

        // Policy updates on the rollouts.
        let (mut loss_sum, mut grad_norm, mut updates) = (0.0f64, 0.0f64, 0usize);
        let (mut clip_low, mut clip_high, mut seen) = (0usize, 0usize, 0usize);
        let mb = n.div_ceil(cfg.minibatches.max(1));
        for _ in 0..cfg.num_iterations {
            let mut idx: Vec<usize> = (0..n).collect();
            rng.shuffle(&mut idx);
            for chunk in idx.chunks(mb) {
                let (batch, cols) = sub_batch(&samples.batch, &samples.columns, chunk);
                let index = dev.tensor_from_vec(cols.clone(), (cols.len(),));
                let old_mb = gather_rows(chunk, &old);
                let lengths: Vec<usize> = chunk.iter().map(|r| samples.columns[*r].len()).collect();
                let lp = token_logprobs(&policy, &batch, OwnedTape::default())
                    .reshape_like(&(batch.batch * batch.seq,))
                    .gather(index);
                let now = lp.as_vec();
                let loss = match cfg.estimator {
                    Estimator::Grpo { loss_type, .. } => {
                        let adv: Vec<f32> = chunk
                            .iter()
                            .flat_map(|r| {
                                std::iter::repeat_n(
                                    advantages[*r] as f32,
                                    samples.columns[*r].len(),
                                )
                            })
                            .collect();
                        let weights = token_weights(
                            &lengths,
                            loss_type,
                            batch_tokens,
                            cfg.minibatches.max(1),
                            cfg.sampling.max_new_tokens,
                        );
                        let ref_mb = refs.as_ref().map(|r| gather_rows(chunk, r));
                        grpo_loss(lp, &old_mb, ref_mb.as_deref(), &adv, &weights, cfg)
                    }
                    Estimator::Rloo => {
                        let adv: Vec<f32> = chunk.iter().map(|r| advantages[*r] as f32).collect();
                        rloo_loss(lp, &old_mb, &adv, &lengths, cfg.epsilon)
                    }
                };
                loss_sum += f64::from(loss.as_vec()[0]);
                for (p, o) in now.iter().zip(&old_mb) {
                    let ratio = f64::from(p - o).exp();
                    clip_low += usize::from(ratio < 1.0 - cfg.epsilon);
                    clip_high += usize::from(ratio > 1.0 + cfg.epsilon_high);
                }
                seen += now.len();
                let grads = gradients(&policy, loss);
                grad_norm += clipped_step(&mut opt, &mut policy, grads, lr, s, it)?;
                updates += 1;
            }
        }

        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let tokens = batch_tokens.max(1) as f64;
        let entropy_mean = samples
            .columns
            .iter()
            .flat_map(|c| pick(&entropy, c))
            .map(f64::from)
            .sum::<f64>()
            / tokens;
        let u = updates.max(1) as f64;
        let secs = clock.elapsed().as_secs_f64();
        let row = vec![
            ("loss", loss_sum / u),
            ("lr", lr),
            ("grad_norm", grad_norm / u),
            ("tokens_per_s", (seen as f64) / secs.max(1e-9)),
            ("reward", raw_mean),
            ("reward_std", raw_std),
            ("reward_model", mean(&rm)),
            ("verifier", mean(&verified)),
            ("groups_equal", groups_equal),
            ("clip_low", clip_low as f64 / seen.max(1) as f64),
            ("clip_high", clip_high as f64 / seen.max(1) as f64),
            ("entropy", entropy_mean),
            ("response_length", tokens / n as f64),
            (
                "finished",
                samples.finished.iter().filter(|f| **f).count() as f64 / n as f64,
            ),
        ];
        let mut row = row;
        if refs.is_some() {
            row.push(("kl", mean(&kl3)));
        }
        log.log(it + 1, &row)?;
        if !raw_mean.is_finite() {
            return Err(TrainError::NonFinite {
                step: it,
                what: "rollout reward",
                value: raw_mean,
            });
        }
        if ckpt.due(it + 1, s) {
            let mut st = LoopState::default();
            st.ints.insert("rng".into(), rng.state());
            st.lists
                .insert("order".into(), order.iter().map(|i| *i as u64).collect());
            let models = [Trained {
                name: "policy",
                params: &policy,
                opt: &opt,
            }];
            ckpt.save(it + 1, &models, &st, &log)?;
        }
        progress.set_position(it as u64 + 1);
        progress.set_message(format!("reward {raw_mean:.3} kl {:.3}", mean(&kl3)));
    }
    super::finish(&policy, log, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpo_advantages_by_hand() {
        // Group [1, 2, 3]: mean 2, Bessel std 1 -> (-1, 0, 1) / 1.0001.
        let a = grpo_advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::Group);
        let d = 1.0 + 1e-4;
        for (x, y) in a.iter().zip([-1.0 / d, 0.0, 1.0 / d, 0.0, 0.0, 0.0]) {
            assert!((x - y).abs() < 1e-12, "{a:?}");
        }
        // All-equal groups give zero advantages, never NaN.
        assert!(grpo_advantages(&[2.0; 4], 2, ScaleRewards::Group)
            .iter()
            .all(|x| *x == 0.0));
        // Dr. GRPO: centred only.
        assert_eq!(
            grpo_advantages(&[1.0, 3.0], 2, ScaleRewards::None),
            [-1.0, 1.0]
        );
        // Batch scale: one std over all six rewards.
        let b = grpo_advantages(&[1.0, 2.0, 3.0, 5.0, 5.0, 5.0], 3, ScaleRewards::Batch);
        let all = [1.0f64, 2.0, 3.0, 5.0, 5.0, 5.0];
        let m = all.iter().sum::<f64>() / 6.0;
        let std = (all.iter().map(|x| (x - m).powi(2)).sum::<f64>() / 5.0).sqrt();
        assert!((b[0] - (-1.0 / (std + 1e-4))).abs() < 1e-12);
    }

    #[test]
    fn rloo_baseline_is_the_mean_of_the_others() {
        // [1, 2, 6]: baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5.
        assert_eq!(rloo_advantages(&[1.0, 2.0, 6.0], 3), [-3.0, -1.5, 4.5]);
        // k = 2: A = r_i - r_j.
        assert_eq!(rloo_advantages(&[1.0, 4.0], 2), [-3.0, 3.0]);
    }

    #[test]
    fn loss_type_weights_on_a_ragged_batch() {
        // Two sequences of 1 and 3 tokens; the batch has 8 tokens in 2 minibatches.
        let l = [1usize, 3];
        let w = token_weights(&l, LossType::Grpo, 8, 2, 5);
        assert_eq!(w, [0.5, 1.0 / 6.0, 1.0 / 6.0, 1.0 / 6.0]); // per-sequence means, averaged
        let w = token_weights(&l, LossType::Bnpo, 8, 2, 5);
        assert_eq!(w, [0.25; 4]); // sum / 4 tokens
        let w = token_weights(&l, LossType::DrGrpo, 8, 2, 5);
        assert_eq!(w, [0.1; 4]); // sum / (2 sequences x 5)
        let w = token_weights(&l, LossType::Dapo, 8, 2, 5);
        assert_eq!(w, [0.25; 4]); // 2 minibatches / 8 tokens: halves of the global mean
    }

    fn cfg() -> GroupConfig {
        GroupConfig {
            estimator: Estimator::Grpo {
                scale_rewards: ScaleRewards::Group,
                loss_type: LossType::Bnpo,
            },
            group_size: 2,
            beta: 0.5,
            epsilon: 0.2,
            epsilon_high: 0.28,
            num_iterations: 1,
            minibatches: 1,
            reward_model_weight: 0.0,
            sampling: SampleSettings::default(),
            pad: 0,
            stops: vec![],
        }
    }

    #[test]
    fn grpo_loss_by_hand_with_clip_higher_and_k3() {
        // Token 1: ratio e^0.5 = 1.6487 > 1.28 with A = 1 -> clipped: 1.28.
        // Token 2: ratio e^-0.5 = 0.6065 < 0.8 with A = -1 -> min(-0.6065, -0.8) = -0.8.
        // k3 of token 1 with ref = lp: 0; of token 2 with ref - lp = 1: e - 2.
        let dev = Dev::default();
        let lp = dev.tensor_from_vec(vec![0.0f32, -1.0], (2,));
        let loss = grpo_loss(
            lp.leaky_traced(),
            &[-0.5, -0.5],
            Some(&[0.0, 0.0]),
            &[1.0, -1.0],
            &[0.5, 0.5],
            &cfg(),
        );
        let k3 = std::f64::consts::E - 2.0;
        let want = 0.5 * (-1.28 + 0.8) + 0.5 * 0.5 * k3;
        assert!(
            (f64::from(loss.as_vec()[0]) - want).abs() < 1e-5,
            "{:?} vs {want}",
            loss.as_vec()
        );
    }

    #[test]
    fn grpo_gradients_by_hand_with_and_without_the_kl_term() {
        // Ratios e^0.05 and e^-0.05, inside the clip range: the loss is
        // -sum w r A, so d/dlp_t = -w_t r_t A_t.
        let dev = Dev::default();
        let lp = dev.tensor_from_vec(vec![0.0f32, 0.0], (2,));
        let mut c = cfg();
        c.beta = 0.0;
        let loss = grpo_loss(
            lp.leaky_trace(),
            &[-0.05, 0.05],
            None,
            &[1.0, -1.0],
            &[0.5, 0.5],
            &c,
        );
        let g = loss.backward().get(&lp).as_vec();
        let (r1, r2) = (0.05f64.exp(), (-0.05f64).exp());
        assert!(
            (f64::from(g[0]) + 0.5 * r1).abs() < 1e-5 && (f64::from(g[1]) - 0.5 * r2).abs() < 1e-5,
            "{g:?}"
        );
        // With beta: d k3 / d lp = 1 - exp(ref - lp); ref = lp + 1 for token 1.
        c.beta = 0.5;
        let loss = grpo_loss(
            lp.leaky_trace(),
            &[-0.05, 0.05],
            Some(&[1.0, 0.0]),
            &[1.0, -1.0],
            &[0.5, 0.5],
            &c,
        );
        let g = loss.backward().get(&lp).as_vec();
        let want0 = -0.5 * r1 + 0.5 * 0.5 * (1.0 - std::f64::consts::E);
        assert!((f64::from(g[0]) - want0).abs() < 1e-5, "{g:?} vs {want0}");
        assert!((f64::from(g[1]) - 0.5 * r2).abs() < 1e-5, "{g:?}");
    }

    #[test]
    fn rloo_loss_uses_the_sequence_ratio() {
        // Sequences of 2 and 1 tokens; log-ratio sums 0.1 and -0.3.
        let dev = Dev::default();
        let lp = dev.tensor_from_vec(vec![0.05f32, 0.05, -0.3], (3,));
        let loss = rloo_loss(
            lp.leaky_trace(),
            &[0.0, 0.0, 0.0],
            &[2.0, -1.0],
            &[2, 1],
            0.2,
        );
        // min(e^0.1 * 2, clip(e^0.1) * 2) = 2 e^0.1 (inside the range);
        // min(-e^-0.3, -clip(e^-0.3 = 0.741 -> 0.8)) = -0.8.
        let want = -(2.0 * 0.1f64.exp() - 0.8) / 2.0;
        assert!(
            (f64::from(loss.as_vec()[0]) - want).abs() < 1e-5,
            "{:?} vs {want}",
            loss.as_vec()
        );
        let grads = loss.backward();
        let g = grads.get(&lp).as_vec();
        // d/dlp of -(2 e^{lp1+lp2})/2 = -e^0.1 for both tokens of sequence 1;
        // sequence 2 is clipped: no gradient.
        assert!(
            (f64::from(g[0]) + 0.1f64.exp()).abs() < 1e-5 && g[2].abs() < 1e-7,
            "{g:?}"
        );
    }
}
