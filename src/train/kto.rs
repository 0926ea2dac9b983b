//! KTO (Ethayarajh et al. 2024; TRL's `KTOTrainer`): unpaired examples,
//! each a prompt + completion labeled desirable or not, against a frozen
//! reference. With `Delta = log pi(y|x) - log ref(y|x)` (sums over the
//! completion) and the reference point `z0 = max(0, mean Delta)` over
//! mismatched (prompt, completion) pairs of the batch (detached), the loss
//! is `w_d (1 - sigmoid(beta (Delta - z0)))` for desirable examples and
//! `w_u (1 - sigmoid(beta (z0 - Delta)))` for undesirable ones, averaged.
//!
//! The mismatched pair of example i is its prompt with the completion of
//! a fixed partner (half the data set away, so a comparison's two halves
//! never pair with each other); their reference log-probs are computed
//! once with the others. Logged: `rewards/desirable`,
//! `rewards/undesirable` (mean `beta Delta`), `kl` (z0 before clamping),
//! and on held-out comparisons `eval_rewards/accuracies` (share where the
//! chosen answer's implicit reward beats the rejected one's).

use std::path::Path;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::causal_lm::LmExamples;
use super::dpo::{logprobs, PairExamples};
use super::metrics::MetricsLog;
use super::optim::TrainSettings;
use super::resume::Checkpoints;
use super::{fit, StepLoss, TrainError};
use crate::data::rng::Rng;
use crate::model::{checkpoint, workers, Dev, LlamaParams};
use crate::stages::Metrics;

/// Examples with labels, and each one's mismatched pair.
pub struct KtoExamples {
    pub examples: LmExamples,
    pub desirable: Vec<bool>,
    /// Prompt i with the completion of example `partner(i)`.
    pub mismatched: LmExamples,
}

#[derive(Debug, Clone, Copy)]
pub struct KtoConfig {
    pub beta: f64,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    pub pad: usize,
}

type V<T> = Tensor<(usize,), f32, Dev, T>;

fn constant(v: &[f32]) -> V<NoneTape> {
    super::preference::constant(&Dev::default(), v)
}

/// Sequence log-probs of every example of `ex`, spread over the workers.
pub fn all_logprobs(
    params: &LlamaParams<f32, Dev>,
    ex: &LmExamples,
    pad: usize,
    batch: usize,
) -> Vec<f32> {
    let rows: Vec<usize> = (0..ex.len()).collect();
    workers::map_chunks(&rows, batch, |_, chunk| {
        logprobs(params, ex, chunk, pad, NoneTape).as_vec()
    })
    .concat()
}

/// The reference model's log-probs of every example and of every
/// mismatched pair.
pub fn reference_logprobs(
    model: &Path,
    data: &KtoExamples,
    pad: usize,
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let params = checkpoint::load(model, &Dev::default())?;
    Ok((
        all_logprobs(&params, &data.examples, pad, batch),
        all_logprobs(&params, &data.mismatched, pad, batch),
    ))
}

/// The mean log-ratio of mismatched pairs (KTO's KL estimate).
pub fn mismatched_kl(policy_mismatched: &[f32], reference_mismatched: &[f32]) -> f64 {
    let n = policy_mismatched.len().max(1) as f64;
    policy_mismatched
        .iter()
        .zip(reference_mismatched)
        .map(|(p, r)| f64::from(p - r))
        .sum::<f64>()
        / n
}

/// The reference point: the mismatched pairs' KL estimate, at least 0.
pub fn z0(policy_mismatched: &[f32], reference_mismatched: &[f32]) -> f64 {
    mismatched_kl(policy_mismatched, reference_mismatched).max(0.0)
}

/// KTO's loss of a batch given its log-ratios' policy part `lp` (taped),
/// the reference log-probs, labels and the reference point.
pub fn kto_loss<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    lp: V<T>,
    reference: &[f32],
    desirable: &[bool],
    z0: f64,
    cfg: &KtoConfig,
) -> Tensor<(), f32, Dev, T> {
    // sign +1 for desirable, -1 for undesirable: 1 - sigmoid(sign beta (Delta - z0)).
    let sign: Vec<f32> = desirable
        .iter()
        .map(|d| {
            if *d {
                cfg.beta as f32
            } else {
                -cfg.beta as f32
            }
        })
        .collect();
    let weight: Vec<f32> = desirable
        .iter()
        .map(|d| if *d { cfg.desirable_weight } else { cfg.undesirable_weight } as f32)
        .collect();
    let shifted: Vec<f32> = reference.iter().map(|r| r + z0 as f32).collect();
    let x = (lp - constant(&shifted)) * constant(&sign);
    let per = (x.sigmoid().negate() + 1.0) * constant(&weight);
    per.mean()
}

/// Train from `init`; `refs` = reference log-probs of the examples and of
/// their mismatched pairs; `eval` = held-out comparisons with their
/// reference log-probs, for the implicit reward's accuracy.
#[allow(clippy::too_many_arguments)]
pub fn train(
    init: &Path,
    data: &KtoExamples,
    refs: (&[f32], &[f32]),
    eval: Option<(&PairExamples, &[f32], &[f32])>,
    cfg: &KtoConfig,
    s: &TrainSettings,
    seed: u64,
    out: &Path,
    ckpt: &Checkpoints,
    progress: &ProgressBar,
) -> Result<Metrics, TrainError> {
    let mut params = checkpoint::load(init, &Dev::default())?;
    let mut columns = vec![
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "rewards/desirable",
        "rewards/undesirable",
        "kl",
    ];
    if eval.is_some() {
        columns.extend(["eval_rewards/accuracies", "eval_rewards/margins"]);
    }
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 20);
    let mut rng = Rng::fork(seed, "kto-batches");
    let n = data.examples.len();
    fit(
        &mut params,
        s,
        || (0..s.batch_size).map(|_| rng.below(n)).collect(),
        |p, rows| {
            // The reference point from this part's mismatched pairs, detached.
            let pm = logprobs(p, &data.mismatched, rows, cfg.pad, NoneTape).as_vec();
            let rm: Vec<f32> = rows.iter().map(|r| refs.1[*r]).collect();
            let kl_raw = pm
                .iter()
                .zip(&rm)
                .map(|(a, b)| f64::from(a - b))
                .sum::<f64>()
                / rows.len().max(1) as f64;
            let z = z0(&pm, &rm);
            let lp = logprobs(p, &data.examples, rows, cfg.pad, OwnedTape::default());
            let now = lp.as_vec();
            let re: Vec<f32> = rows.iter().map(|r| refs.0[*r]).collect();
            let labels: Vec<bool> = rows.iter().map(|r| data.desirable[*r]).collect();
            let mean_of = |want: bool| {
                let v: Vec<f64> = now
                    .iter()
                    .zip(&re)
                    .zip(&labels)
                    .filter(|(_, l)| **l == want)
                    .map(|((a, b), _)| cfg.beta * f64::from(a - b))
                    .collect();
                if v.is_empty() {
                    f64::NAN
                } else {
                    v.iter().sum::<f64>() / v.len() as f64
                }
            };
            let mut extras = vec![("kl", kl_raw)];
            for (name, want) in [("rewards/desirable", true), ("rewards/undesirable", false)] {
                let m = mean_of(want);
                if m.is_finite() {
                    extras.push((name, m));
                }
            }
            let tokens = rows.iter().map(|r| data.examples.trained[*r].len()).sum();
            Ok(StepLoss {
                loss: kto_loss(lp, &re, &labels, z, cfg),
                tokens,
                units: rows.len() as f64,
                extras,
            })
        },
        |p| {
            let Some((e, rc, rr)) = eval else {
                return Ok(Vec::new());
            };
            let pc = all_logprobs(p, &e.chosen, cfg.pad, s.batch_size);
            let pr = all_logprobs(p, &e.rejected, cfg.pad, s.batch_size);
            let m = pc.len().max(1) as f64;
            let (mut acc, mut margin) = (0.0, 0.0);
            for i in 0..pc.len() {
                let wc = cfg.beta * f64::from(pc[i] - rc[i]);
                let wr = cfg.beta * f64::from(pr[i] - rr[i]);
                acc += f64::from(u8::from(wc > wr)) / m;
                margin += (wc - wr) / m;
            }
            Ok(vec![
                ("eval_rewards/accuracies", acc),
                ("eval_rewards/margins", margin),
            ])
        },
        ckpt,
        &mut log,
        progress,
    )?;
    super::finish(&params, log, out)
}

/// KTO's recommended balance: `w_d n_d / (w_u n_u)` in [1, 4/3]; `Some`
/// message when outside.
pub fn balance_warning(cfg: &KtoConfig, desirable: usize, undesirable: usize) -> Option<String> {
    let ratio = cfg.desirable_weight * desirable as f64
        / (cfg.undesirable_weight * undesirable.max(1) as f64);
    (!(1.0..=4.0 / 3.0 + 1e-9).contains(&ratio)).then(|| {
        format!(
            "desirable_weight x {desirable} desirable / (undesirable_weight x {undesirable} undesirable) = {ratio:.3}, outside the KTO paper's recommended [1, 4/3]: adjust the weights"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KtoConfig {
        KtoConfig {
            beta: 0.5,
            desirable_weight: 1.0,
            undesirable_weight: 2.0,
            pad: 0,
        }
    }

    #[test]
    fn z0_is_the_clamped_mean_log_ratio() {
        assert!((z0(&[-1.0, -2.0], &[-1.5, -1.5]) - 0.0).abs() < 1e-12); // mean 0
        assert!((z0(&[-1.0, -1.0], &[-2.0, -1.5]) - 0.75).abs() < 1e-12);
        assert_eq!(z0(&[-3.0], &[-1.0]), 0.0); // negative mean clamps to 0
    }

    #[test]
    fn kto_loss_by_hand() {
        // Delta = 1 (desirable) and 1 (undesirable), z0 = 0.2, beta 0.5:
        // desirable 1 - s(0.4), undesirable 2 (1 - s(-0.4)); mean of the two.
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want = ((1.0 - s(0.4)) + 2.0 * (1.0 - s(-0.4))) / 2.0;
        let got = kto_loss(
            constant(&[0.0, 0.0]),
            &[-1.0, -1.0],
            &[true, false],
            0.2,
            &cfg(),
        )
        .as_vec()[0];
        assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn balance_rule() {
        let c = KtoConfig {
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            ..cfg()
        };
        assert!(balance_warning(&c, 100, 100).is_none());
        assert!(balance_warning(&c, 100, 50).unwrap().contains("2.000"));
        assert!(balance_warning(&c, 50, 100).is_some());
    }
}
