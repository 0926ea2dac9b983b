//! Preference-learning losses and RL quantities, one function each, with
//! the equation they implement.
//!
//! - reward model: `-log sigmoid(r(x, y_w) - r(x, y_l) - m)` (InstructGPT
//!   Eq. 1; TRL's optional margin `m`), averaged over pairs;
//! - DPO (Rafailov et al. 2023, Eq. 7): `-log sigmoid(beta h)` with
//!   `h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`;
//!   cDPO label smoothing `(1-e) L(h) + e L(-h)`; IPO `(h - 1/(2 beta))^2`;
//!   hinge `relu(1 - beta h)`;
//! - PPO (Schulman et al. 2017): clipped surrogate
//!   `-min(r A, clip(r, 1-c, 1+c) A)` with `r = exp(log pi - log pi_old)`,
//!   and the clipped value loss `0.5 max((v-R)^2, (v_clip-R)^2)`;
//! - GAE (Schulman et al. 2016): `A_t = delta_t + gamma lambda A_{t+1}`,
//!   `delta_t = r_t + gamma V_{t+1} - V_t`;
//! - KL estimators on samples from pi (Schulman's note): `k1 = log pi - log ref`,
//!   `k3 = (q - 1) - log q` with `q = ref / pi` (always >= 0).

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::kernels::Kernels;
use crate::model::llama::{token_logprobs, TokenBatch};
use crate::model::LlamaParams;

type Vector<D, T> = Tensor<(usize,), f32, D, T>;
type Scalar<D, T> = Tensor<(), f32, D, T>;

/// A constant vector (no tape) on `dev`.
pub(crate) fn constant<D: Device<f32>>(dev: &D, values: &[f32]) -> Vector<D, NoneTape> {
    dev.tensor_from_vec(values.to_vec(), (values.len(),))
}

/// `-log sigmoid(x)` element-wise, computed stably.
pub(crate) fn neg_log_sigmoid<D: Device<f32>, T: Tape<f32, D> + Merge<NoneTape>>(
    x: Vector<D, T>,
) -> Vector<D, T> {
    let ones = x.device().ones_like(x.shape());
    x.bce_with_logits(ones)
}

/// Sum of log-probs of the weighted tokens of each sequence: (B,).
/// `weights[b, t]` weights the prediction of token t+1 (1 on response tokens).
pub fn sequence_logprobs<D, T>(
    params: &LlamaParams<f32, D>,
    batch: &TokenBatch,
    weights: &[f32],
    tape: T,
) -> Vector<D, T>
where
    D: Kernels<f32>,
    T: Tape<f32, D> + Merge<T> + Merge<NoneTape>,
{
    let dev = params.embed_tokens.device().clone();
    let w = dev.tensor_from_vec(weights.to_vec(), (batch.batch, batch.seq));
    (token_logprobs(params, batch, tape) * w).sum::<(usize,), Axis<1>>()
}

/// Pairwise reward-model loss, averaged over pairs.
pub fn pairwise_loss<D: Device<f32>, T: Tape<f32, D> + Merge<T> + Merge<NoneTape>>(
    chosen: Vector<D, T>,
    rejected: Vector<D, T>,
    margin: Option<&[f32]>,
) -> Scalar<D, T> {
    let dev = chosen.device().clone();
    let mut diff = chosen - rejected;
    if let Some(m) = margin {
        diff = diff - constant(&dev, m);
    }
    neg_log_sigmoid(diff).mean()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
    Hinge,
}

/// The DPO family of losses, averaged over pairs. `ref_*` are the frozen
/// reference model's sequence log-probs.
pub fn dpo_loss<D: Device<f32>, T: Tape<f32, D> + Merge<T> + Merge<NoneTape>>(
    policy_chosen: Vector<D, T>,
    policy_rejected: Vector<D, T>,
    ref_chosen: &[f32],
    ref_rejected: &[f32],
    beta: f64,
    kind: DpoLoss,
    label_smoothing: f64,
) -> Scalar<D, T> {
    let dev = policy_chosen.device().clone();
    let h = (policy_chosen - constant(&dev, ref_chosen))
        - (policy_rejected - constant(&dev, ref_rejected));
    match kind {
        DpoLoss::Sigmoid => {
            let logits = h * beta as f32;
            if label_smoothing == 0.0 {
                neg_log_sigmoid(logits).mean()
            } else {
                let flipped = neg_log_sigmoid(logits.retaped::<T>().negate());
                (neg_log_sigmoid(logits) * (1.0 - label_smoothing) as f32
                    + flipped * label_smoothing as f32)
                    .mean()
            }
        }
        DpoLoss::Ipo => (h - (1.0 / (2.0 * beta)) as f32).square().mean(),
        DpoLoss::Hinge => (h * (-beta) as f32 + 1.0).relu().mean(),
    }
}

/// PPO's clipped surrogate over tokens, averaged.
pub fn ppo_policy_loss<D: Device<f32>, T: Tape<f32, D> + Merge<T> + Merge<NoneTape>>(
    logp: Vector<D, T>,
    old_logp: &[f32],
    advantages: &[f32],
    clip: f64,
) -> Scalar<D, T> {
    let dev = logp.device().clone();
    let ratio = (logp - constant(&dev, old_logp)).exp();
    let unclipped = ratio.retaped::<T>() * constant(&dev, advantages);
    let clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * constant(&dev, advantages);
    unclipped.minimum(clipped).mean().negate()
}

/// PPO's clipped value loss, averaged.
pub fn ppo_value_loss<D: Device<f32>, T: Tape<f32, D> + Merge<T> + Merge<NoneTape>>(
    values: Vector<D, T>,
    old_values: &[f32],
    returns: &[f32],
    clip: f64,
) -> Scalar<D, T> {
    let dev = values.device().clone();
    let old = constant(&dev, old_values);
    let clipped = (values.retaped::<T>() - old.clone()).clamp(-clip, clip) + old;
    let plain = (values - constant(&dev, returns)).square();
    let clipped = (clipped - constant(&dev, returns)).square();
    plain.maximum(clipped).mean() * 0.5
}

/// Generalised advantage estimates and returns of one sequence; the state
/// after the last token is terminal (value 0).
pub fn gae(rewards: &[f32], values: &[f32], gamma: f64, lambda: f64) -> (Vec<f32>, Vec<f32>) {
    let n = rewards.len();
    let mut adv = vec![0.0f32; n];
    let mut next_adv = 0.0f64;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] as f64 } else { 0.0 };
        let delta = rewards[t] as f64 + gamma * next_value - values[t] as f64;
        next_adv = delta + gamma * lambda * next_adv;
        adv[t] = next_adv as f32;
    }
    let returns = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, returns)
}

/// The k1 estimator of KL(pi || ref) per token: `log pi - log ref`.
pub fn kl_k1(logp: &[f32], ref_logp: &[f32]) -> Vec<f32> {
    logp.iter().zip(ref_logp).map(|(p, r)| p - r).collect()
}

/// The k3 estimator per token: `(q - 1) - log q`, `q = ref / pi`.
pub fn kl_k3(logp: &[f32], ref_logp: &[f32]) -> Vec<f32> {
    logp.iter()
        .zip(ref_logp)
        .map(|(p, r)| {
            let log_q = (r - p) as f64;
            (log_q.exp() - 1.0 - log_q) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(dev: &Cpu, x: &[f32]) -> Vector<Cpu, NoneTape> {
        dev.tensor_from_vec(x.to_vec(), (x.len(),))
    }

    fn close(a: f32, b: f64) {
        assert!((a as f64 - b).abs() < 1e-5, "{a} vs {b}");
    }

    #[test]
    fn pairwise_loss_by_hand() {
        let dev = Cpu::default();
        // diffs [1, -1]: (softplus(-1) + softplus(1)) / 2 = (0.3132617 + 1.3132617) / 2
        close(
            pairwise_loss(v(&dev, &[2.0, 0.0]), v(&dev, &[1.0, 1.0]), None).array(),
            0.8132617,
        );
        // margin 0.5: diffs [0.5, -1.5]: (0.4740770 + 1.7014132) / 2
        close(
            pairwise_loss(
                v(&dev, &[2.0, 0.0]),
                v(&dev, &[1.0, 1.0]),
                Some(&[0.5, 0.5]),
            )
            .array(),
            1.0877451,
        );
    }

    #[test]
    fn dpo_losses_by_hand() {
        let dev = Cpu::default();
        // h = (-5 - -6) - (-7 - -6) = 2; beta = 0.1
        let loss = |kind, eps| {
            dpo_loss(
                v(&dev, &[-5.0]),
                v(&dev, &[-7.0]),
                &[-6.0],
                &[-6.0],
                0.1,
                kind,
                eps,
            )
            .array()
        };
        close(loss(DpoLoss::Sigmoid, 0.0), 0.5981389); // softplus(-0.2)
        close(
            loss(DpoLoss::Sigmoid, 0.1),
            0.9 * 0.5981389 + 0.1 * 0.7981389,
        ); // + softplus(0.2)
        close(loss(DpoLoss::Ipo, 0.0), 9.0); // (2 - 1/0.2)^2
        close(loss(DpoLoss::Hinge, 0.0), 0.8); // relu(1 - 0.2)
                                               // Policy == reference: h = 0, loss = log 2.
        close(
            dpo_loss(
                v(&dev, &[-3.0]),
                v(&dev, &[-4.0]),
                &[-3.0],
                &[-4.0],
                0.1,
                DpoLoss::Sigmoid,
                0.0,
            )
            .array(),
            std::f64::consts::LN_2,
        );
    }

    #[test]
    fn ppo_losses_by_hand() {
        let dev = Cpu::default();
        // ratios [1.5, 0.5, 1.1], A [1, 1, -2], clip 0.2:
        // min(rA, clip(r)A) = [1.2, 0.5, -2.2]; loss = -mean = 0.5 / 3
        let logp = v(&dev, &[1.5f32.ln(), 0.5f32.ln(), 1.1f32.ln()]);
        close(
            ppo_policy_loss(logp, &[0.0; 3], &[1.0, 1.0, -2.0], 0.2).array(),
            0.5 / 3.0,
        );
        // v [1, 0.1], old [0, 0], R [2, 0], clip 0.2: v_clip [0.2, 0.1];
        // max((v-R)^2, (v_clip-R)^2) = [3.24, 0.01]; 0.5 * mean = 0.8125
        close(
            ppo_value_loss(v(&dev, &[1.0, 0.1]), &[0.0, 0.0], &[2.0, 0.0], 0.2).array(),
            0.8125,
        );
    }

    #[test]
    fn gae_matches_the_unrolled_recursion() {
        // gamma 0.9, lambda 0.8: deltas [1 + 0.36 - 0.5, 0 + 0.27 - 0.4, 2 - 0.3]
        //   = [0.86, -0.13, 1.7]; A2 = 1.7; A1 = -0.13 + 0.72 * 1.7 = 1.094;
        //   A0 = 0.86 + 0.72 * 1.094 = 1.64768; returns = A + V.
        let (a, r) = gae(&[1.0, 0.0, 2.0], &[0.5, 0.4, 0.3], 0.9, 0.8);
        for (x, y) in a.iter().zip([1.64768, 1.094, 1.7]) {
            close(*x, y);
        }
        for (x, y) in r.iter().zip([2.14768, 1.494, 2.0]) {
            close(*x, y);
        }
    }

    #[test]
    fn kl_estimators_by_hand() {
        // log pi = -1, log ref = -1.5: k1 = 0.5; q = e^-0.5 = 0.6065307;
        // k3 = (q - 1) - log q = -0.3934693 + 0.5
        close(kl_k1(&[-1.0], &[-1.5])[0], 0.5);
        close(kl_k3(&[-1.0], &[-1.5])[0], 0.1065307);
        assert!(kl_k3(&[-2.0, 0.3], &[-1.0, 0.1]).iter().all(|k| *k >= 0.0));
    }

    #[test]
    fn dpo_gradient_at_the_reference_is_minus_beta_over_two_times_the_margin_gradient() {
        use crate::model::LlamaConfig;
        let cfg = LlamaConfig::tiny(11, 8, 1, 2, 1);
        let dev = Cpu::default();
        let p = LlamaParams::<f32, Cpu>::init(&cfg, false, 2, &dev);
        let chosen = TokenBatch::right_padded(&[vec![1, 2, 3, 4]], 0);
        let rejected = TokenBatch::right_padded(&[vec![1, 2, 5, 6]], 0);
        let w = [0.0, 1.0, 1.0, 0.0]; // response = tokens 2 and 3
        let ref_c = sequence_logprobs(&p, &chosen, &w, NoneTape).as_vec();
        let ref_r = sequence_logprobs(&p, &rejected, &w, NoneTape).as_vec();
        let beta = 0.5;

        let pc = sequence_logprobs(&p, &chosen, &w, OwnedTape::<f32, Cpu>::default());
        let pr = sequence_logprobs(&p, &rejected, &w, OwnedTape::<f32, Cpu>::default());
        let loss = dpo_loss(pc, pr, &ref_c, &ref_r, beta, DpoLoss::Sigmoid, 0.0);
        close(loss.array(), std::f64::consts::LN_2);
        let g_loss = loss.backward();

        let pc = sequence_logprobs(&p, &chosen, &w, OwnedTape::<f32, Cpu>::default());
        let pr = sequence_logprobs(&p, &rejected, &w, OwnedTape::<f32, Cpu>::default());
        let g_margin = (pc - pr).sum().backward();
        for (name, t) in p.named() {
            let a = g_loss.get(t).as_vec();
            let b = g_margin.get(t).as_vec();
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x + beta as f32 / 2.0 * y).abs() < 1e-6,
                    "{name}: {x} vs {}",
                    -beta as f32 / 2.0 * y
                );
            }
        }
    }
}
