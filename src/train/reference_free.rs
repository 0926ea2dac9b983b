//! Preference losses without a reference model, on length-averaged
//! log-probs `lp = (1/|y|) sum_t log pi(y_t | x, y_<t)`:
//!
//! - ORPO (Hong et al. 2024, Eq. 6-7; TRL's `ORPOTrainer`):
//!   `NLL(chosen) - beta log sigmoid(log_odds)`, with
//!   `log_odds = (lp_c - lp_r) - (log(1 - e^lp_c) - log(1 - e^lp_r))`.
//!   The NLL is the mean over the batch of each chosen answer's
//!   per-token NLL. Implicit reward: the log-odds of each answer.
//! - SimPO (Meng et al. 2024, Eq. 6; TRL's CPO trainer with
//!   `loss_type = "simpo"`): `-log sigmoid(beta (lp_c - lp_r) - gamma)`, plus
//!   `sft_weight` times the chosen NLL (TRL's `cpo_alpha`, 1.0 there; the
//!   paper's SimPO has none, so the default here is 0). Implicit reward:
//!   `beta lp`.
//!
//! Logged with TRL's names: `rewards/chosen`, `rewards/rejected`,
//! `rewards/accuracies`, `rewards/margins` (implicit rewards), `nll`,
//! `logps/chosen`, `logps/rejected` (length-averaged), and their `eval_`
//! versions on held-out pairs.

use std::path::Path;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::causal_lm::{batch_of, LmExamples};
use super::dpo::PairExamples;
use super::metrics::MetricsLog;
use super::optim::TrainSettings;
use super::preference::sequence_logprobs;
use super::resume::Checkpoints;
use super::{fit, StepLoss, TrainError};
use crate::data::rng::Rng;
use crate::model::{checkpoint, workers, Dev, LlamaParams};
use crate::stages::Metrics;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefFreeLoss {
    Orpo {
        beta: f64,
    },
    Simpo {
        beta: f64,
        gamma: f64,
        sft_weight: f64,
    },
}

type V<T> = Tensor<(usize,), f32, Dev, T>;
type S<T> = Tensor<(), f32, Dev, T>;

fn constant(v: &[f32]) -> V<NoneTape> {
    super::preference::constant(&Dev::default(), v)
}

use super::preference::neg_log_sigmoid;

/// `log(1 - e^lp)` for lp < 0, kept finite as lp approaches 0.
fn log1m_exp<T: Tape<f32, Dev> + Merge<NoneTape>>(lp: V<T>) -> V<T> {
    (lp.exp().negate() + 1.0).clamp(1e-7, 1.0).ln()
}

/// ORPO's log-odds ratio of chosen over rejected, per pair.
pub fn orpo_log_odds<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    lp_c: V<T>,
    lp_r: V<T>,
) -> V<T> {
    let odds_c = lp_c.retaped::<T>() - log1m_exp(lp_c);
    let odds_r = lp_r.retaped::<T>() - log1m_exp(lp_r);
    odds_c - odds_r
}

/// The loss of a batch from length-averaged log-probs.
pub fn loss<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    lp_c: V<T>,
    lp_r: V<T>,
    kind: RefFreeLoss,
) -> S<T> {
    match kind {
        RefFreeLoss::Orpo { beta } => {
            let nll = lp_c.retaped::<T>().negate().mean();
            let odds = orpo_log_odds(lp_c, lp_r);
            nll + neg_log_sigmoid(odds).mean() * beta as f32
        }
        RefFreeLoss::Simpo {
            beta,
            gamma,
            sft_weight,
        } => {
            let nll = lp_c.retaped::<T>().negate().mean() * sft_weight as f32;
            let h = (lp_c - lp_r) * beta as f32 - gamma as f32;
            neg_log_sigmoid(h).mean() + nll
        }
    }
}

/// Implicit rewards of chosen and rejected answers (plain numbers).
fn implicit_rewards(lp_c: &[f32], lp_r: &[f32], kind: RefFreeLoss) -> (Vec<f64>, Vec<f64>) {
    let odds = |lp: f32| {
        let lp = f64::from(lp);
        lp - (1.0 - lp.exp()).max(1e-7).ln()
    };
    match kind {
        RefFreeLoss::Orpo { .. } => (
            lp_c.iter().map(|x| odds(*x)).collect(),
            lp_r.iter().map(|x| odds(*x)).collect(),
        ),
        RefFreeLoss::Simpo { beta, .. } => (
            lp_c.iter().map(|x| beta * f64::from(*x)).collect(),
            lp_r.iter().map(|x| beta * f64::from(*x)).collect(),
        ),
    }
}

/// Length-averaged log-probs of some rows.
fn avg_logprobs<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    params: &LlamaParams<f32, Dev>,
    ex: &LmExamples,
    rows: &[usize],
    pad: usize,
    tape: T,
) -> V<T> {
    let (batch, weights) = batch_of(ex, rows, pad);
    let counts: Vec<f32> = weights
        .chunks(batch.seq)
        .map(|w| 1.0 / w.iter().sum::<f32>().max(1.0))
        .collect();
    sequence_logprobs(params, &batch, &weights, tape) * constant(&counts)
}

fn stats(prefix: bool, lp_c: &[f32], lp_r: &[f32], kind: RefFreeLoss) -> Vec<(&'static str, f64)> {
    let (rc, rr) = implicit_rewards(lp_c, lp_r, kind);
    let n = rc.len().max(1) as f64;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / n;
    let acc = rc.iter().zip(&rr).filter(|(c, r)| c > r).count() as f64 / n;
    let names: [&'static str; 6] = if prefix {
        [
            "eval_rewards/chosen",
            "eval_rewards/rejected",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_logps/chosen",
            "eval_logps/rejected",
        ]
    } else {
        [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ]
    };
    let lc: Vec<f64> = lp_c.iter().map(|x| f64::from(*x)).collect();
    let lr: Vec<f64> = lp_r.iter().map(|x| f64::from(*x)).collect();
    vec![
        (names[0], mean(&rc)),
        (names[1], mean(&rr)),
        (names[2], acc),
        (names[3], mean(&rc) - mean(&rr)),
        (names[4], mean(&lc)),
        (names[5], mean(&lr)),
    ]
}

/// Train from `init` on `pairs`; writes the model folder and metrics to `out`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    init: &Path,
    pairs: &PairExamples,
    eval: Option<&PairExamples>,
    kind: RefFreeLoss,
    pad: usize,
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
        "nll",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ];
    if eval.is_some() {
        columns.extend([
            "eval_loss",
            "eval_rewards/chosen",
            "eval_rewards/rejected",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_logps/chosen",
            "eval_logps/rejected",
        ]);
    }
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 20);
    let mut rng = Rng::fork(seed, "ref-free-batches");
    fit(
        &mut params,
        s,
        || (0..s.batch_size).map(|_| rng.below(pairs.len())).collect(),
        |p, rows| {
            let lc = avg_logprobs(p, &pairs.chosen, rows, pad, OwnedTape::default());
            let lr = avg_logprobs(p, &pairs.rejected, rows, pad, OwnedTape::default());
            let (vc, vr) = (lc.as_vec(), lr.as_vec());
            let mut extras = stats(false, &vc, &vr, kind);
            extras.push((
                "nll",
                -vc.iter().map(|x| f64::from(*x)).sum::<f64>() / vc.len().max(1) as f64,
            ));
            let tokens = rows
                .iter()
                .map(|r| pairs.chosen.trained[*r].len() + pairs.rejected.trained[*r].len())
                .sum();
            Ok(StepLoss {
                loss: loss(lc, lr, kind),
                tokens,
                units: rows.len() as f64,
                extras,
            })
        },
        |p| {
            let Some(e) = eval else {
                return Ok(Vec::new());
            };
            let rows: Vec<usize> = (0..e.len()).collect();
            let parts = workers::map_chunks(&rows, s.batch_size, |_, chunk| {
                (
                    avg_logprobs(p, &e.chosen, chunk, pad, NoneTape).as_vec(),
                    avg_logprobs(p, &e.rejected, chunk, pad, NoneTape).as_vec(),
                )
            });
            let (c, r): (Vec<Vec<f32>>, Vec<Vec<f32>>) = parts.into_iter().unzip();
            let (c, r) = (c.concat(), r.concat());
            let l = loss(constant(&c), constant(&r), kind).as_vec()[0];
            let mut out = vec![("eval_loss", f64::from(l))];
            out.extend(stats(true, &c, &r, kind));
            Ok(out)
        },
        ckpt,
        &mut log,
        progress,
    )?;
    super::finish(&params, log, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(lc: &[f32], lr: &[f32], kind: RefFreeLoss) -> f64 {
        f64::from(loss(constant(lc), constant(lr), kind).as_vec()[0])
    }

    #[test]
    fn orpo_log_odds_and_loss_by_hand() {
        // lp_c = ln 0.5, lp_r = ln 0.25: odds 1 and 1/3, log-odds ratio ln 3.
        let (c, r) = (0.5f64.ln(), 0.25f64.ln());
        let odds = orpo_log_odds(constant(&[c as f32]), constant(&[r as f32])).as_vec()[0];
        assert!((f64::from(odds) - 3f64.ln()).abs() < 1e-5, "{odds}");
        // loss = -lp_c + beta * -log sigmoid(ln 3) = ln 2 + 0.1 ln(4/3).
        let want = 2f64.ln() + 0.1 * (4.0f64 / 3.0).ln();
        let got = value(&[c as f32], &[r as f32], RefFreeLoss::Orpo { beta: 0.1 });
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn simpo_margin_by_hand() {
        // beta (lp_c - lp_r) - gamma = 2 (-1 + 2) - 0.5 = 1.5.
        let kind = RefFreeLoss::Simpo {
            beta: 2.0,
            gamma: 0.5,
            sft_weight: 0.0,
        };
        let want = (1.0 + (-1.5f64).exp()).ln();
        assert!((value(&[-1.0], &[-2.0], kind) - want).abs() < 1e-5);
        // With the chosen NLL mixed in.
        let kind = RefFreeLoss::Simpo {
            beta: 2.0,
            gamma: 0.5,
            sft_weight: 1.0,
        };
        assert!((value(&[-1.0], &[-2.0], kind) - (want + 1.0)).abs() < 1e-5);
    }

    #[test]
    fn orpo_gradient_matches_finite_differences() {
        let kind = RefFreeLoss::Orpo { beta: 0.7 };
        let (c, r) = (-0.8f32, -1.9f32);
        let dev = Dev::default();
        let (t, u) = (
            dev.tensor_from_vec(vec![c], (1,)),
            dev.tensor_from_vec(vec![r], (1,)),
        );
        let g = loss(t.leaky_trace(), u.leaky_trace(), kind)
            .backward()
            .get(&t)
            .as_vec()[0];
        let h = 1e-3f32;
        let fd = (value(&[c + h], &[r], kind) - value(&[c - h], &[r], kind)) / (2.0 * f64::from(h));
        assert!((f64::from(g) - fd).abs() < 1e-3, "{g} vs {fd}");
    }
}
