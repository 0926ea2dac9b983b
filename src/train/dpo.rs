//! Direct preference optimisation of a policy against a frozen reference:
//! the reference's sequence log-probs are computed once (and cached by the
//! caller), the policy trains on the DPO family of losses, and the logs use
//! TRL's metric names (`rewards/chosen`, `rewards/margins`, ...).

use std::path::Path;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::causal_lm::{batch_of, LmExamples};
use super::metrics::MetricsLog;
use super::optim::TrainSettings;
use super::preference::{dpo_loss, sequence_logprobs, DpoLoss};
use super::resume::Checkpoints;
use super::{fit, StepLoss, TrainError};
use crate::data::rng::Rng;
use crate::model::{checkpoint, workers, Dev, LlamaParams};
use crate::stages::Metrics;

/// Prompt + chosen and prompt + rejected sequences, row for row, with the
/// response tokens marked as trained.
pub struct PairExamples {
    pub chosen: LmExamples,
    pub rejected: LmExamples,
}

impl PairExamples {
    pub fn len(&self) -> usize {
        self.chosen.len()
    }
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }
}

/// DPO's settings besides the optimizer's.
#[derive(Debug, Clone)]
pub struct DpoConfig {
    pub beta: f64,
    pub loss: DpoLoss,
    pub label_smoothing: f64,
    pub pad: usize,
}

/// Sequence log-probs of some rows of `ex` (response tokens only).
pub(crate) fn logprobs<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    params: &LlamaParams<f32, Dev>,
    ex: &LmExamples,
    rows: &[usize],
    pad: usize,
    tape: T,
) -> Tensor<(usize,), f32, Dev, T> {
    let (batch, weights) = batch_of(ex, rows, pad);
    sequence_logprobs(params, &batch, &weights, tape)
}

/// Sequence log-probs of every chosen and rejected response under a model.
pub fn reference_logprobs(
    model: &Path,
    pairs: &PairExamples,
    pad: usize,
    batch_size: usize,
) -> Result<(Vec<f32>, Vec<f32>), TrainError> {
    let params = checkpoint::load(model, &Dev::default())?;
    Ok(pair_logprobs(&params, pairs, pad, batch_size))
}

/// Sequence log-probs of every pair's chosen and rejected response, the
/// batches spread over the workers.
fn pair_logprobs(
    params: &LlamaParams<f32, Dev>,
    pairs: &PairExamples,
    pad: usize,
    batch_size: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows: Vec<usize> = (0..pairs.len()).collect();
    let parts = workers::map_chunks(&rows, batch_size, |_, chunk| {
        (
            logprobs(params, &pairs.chosen, chunk, pad, NoneTape).as_vec(),
            logprobs(params, &pairs.rejected, chunk, pad, NoneTape).as_vec(),
        )
    });
    let (c, r): (Vec<Vec<f32>>, Vec<Vec<f32>>) = parts.into_iter().unzip();
    (c.concat(), r.concat())
}

/// TRL-named statistics of a batch of implicit rewards `beta (log pi - log ref)`.
fn reward_stats(
    prefix: &str,
    beta: f64,
    pc: &[f32],
    pr: &[f32],
    rc: &[f32],
    rr: &[f32],
) -> Vec<(&'static str, f64)> {
    let n = pc.len().max(1) as f64;
    let (mut chosen, mut rejected, mut acc, mut kl) = (0.0, 0.0, 0.0, 0.0);
    for i in 0..pc.len() {
        let wc = beta * (pc[i] - rc[i]) as f64;
        let wr = beta * (pr[i] - rr[i]) as f64;
        chosen += wc / n;
        rejected += wr / n;
        acc += f64::from(u8::from(wc > wr)) / n;
        kl += ((pc[i] - rc[i]) + (pr[i] - rr[i])) as f64 / (2.0 * n);
    }
    let names: [&'static str; 5] = if prefix.is_empty() {
        [
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "kl_proxy",
        ]
    } else {
        [
            "eval_rewards/chosen",
            "eval_rewards/rejected",
            "eval_rewards/accuracies",
            "eval_rewards/margins",
            "eval_kl_proxy",
        ]
    };
    vec![
        (names[0], chosen),
        (names[1], rejected),
        (names[2], acc),
        (names[3], chosen - rejected),
        (names[4], kl),
    ]
}

/// Train the policy (initialised from `init`) and write the model folder
/// and `metrics.parquet` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    init: &Path,
    pairs: &PairExamples,
    refs: (&[f32], &[f32]),
    eval: Option<(&PairExamples, &[f32], &[f32])>,
    cfg: &DpoConfig,
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
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "kl_proxy",
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
            "eval_kl_proxy",
        ]);
    }
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 20);
    let mut rng = Rng::fork(seed, "dpo-batches");
    let loss_of = |pc, pr, rc: &[f32], rr: &[f32]| {
        dpo_loss(pc, pr, rc, rr, cfg.beta, cfg.loss, cfg.label_smoothing)
    };
    fit(
        &mut params,
        s,
        || (0..s.batch_size).map(|_| rng.below(pairs.len())).collect(),
        |p, rows| {
            let rc: Vec<f32> = rows.iter().map(|r| refs.0[*r]).collect();
            let rr: Vec<f32> = rows.iter().map(|r| refs.1[*r]).collect();
            let pc = logprobs(p, &pairs.chosen, rows, cfg.pad, OwnedTape::default());
            let pr = logprobs(p, &pairs.rejected, rows, cfg.pad, OwnedTape::default());
            let (vc, vr) = (pc.as_vec(), pr.as_vec());
            let mut extras = reward_stats("", cfg.beta, &vc, &vr, &rc, &rr);
            extras.push((
                "logps/chosen",
                vc.iter().map(|x| *x as f64).sum::<f64>() / vc.len() as f64,
            ));
            extras.push((
                "logps/rejected",
                vr.iter().map(|x| *x as f64).sum::<f64>() / vr.len() as f64,
            ));
            let tokens = rows
                .iter()
                .map(|r| pairs.chosen.trained[*r].len() + pairs.rejected.trained[*r].len())
                .sum();
            Ok(StepLoss {
                loss: loss_of(pc, pr, &rc, &rr),
                tokens,
                units: rows.len() as f64,
                extras,
            })
        },
        |p| {
            let Some((e, rc, rr)) = eval else {
                return Ok(Vec::new());
            };
            let (pc, pr) = pair_logprobs(p, e, cfg.pad, s.batch_size);
            let dev = Dev::default();
            let (tc, tr) = (
                dev.tensor_from_vec(pc.clone(), (pc.len(),)),
                dev.tensor_from_vec(pr.clone(), (pr.len(),)),
            );
            let loss = dpo_loss(tc, tr, rc, rr, cfg.beta, cfg.loss, cfg.label_smoothing).as_vec()[0]
                as f64;
            let mut out = vec![("eval_loss", loss)];
            out.extend(reward_stats("eval", cfg.beta, &pc, &pr, rc, rr));
            Ok(out)
        },
        ckpt,
        &mut log,
        progress,
    )?;
    let metrics = super::finish(&params, log, out)?;
    Ok(metrics)
}
