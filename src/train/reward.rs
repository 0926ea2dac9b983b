//! Reward-model training: a Llama backbone from an upstream model plus a
//! scalar head read at the last token of prompt + response, trained with the
//! pairwise loss. Pairs expanded from one ranking share a group and are
//! batched together, as InstructGPT did (shuffled pairs of one prompt
//! overfit within an epoch).

use std::path::Path;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::causal_lm::{batch_of, LmExamples};
use super::dpo::PairExamples;
use super::metrics::MetricsLog;
use super::optim::TrainSettings;
use super::preference::pairwise_loss;
use super::resume::Checkpoints;
use super::{fit, StepLoss, TrainError};
use crate::data::rng::Rng;
use crate::model::llama::scalar_at_last;
use crate::model::{checkpoint, workers, Dev, LlamaParams};
use crate::stages::Metrics;

/// Comparisons as token sequences, with each pair's group and margin.
pub struct RewardPairs {
    pub pairs: PairExamples,
    pub groups: Vec<u64>,
    pub margins: Vec<f32>,
}

fn rewards<T: Tape<f32, Dev> + Merge<T> + Merge<NoneTape>>(
    params: &LlamaParams<f32, Dev>,
    ex: &LmExamples,
    rows: &[usize],
    pad: usize,
    tape: T,
) -> Tensor<(usize,), f32, Dev, T> {
    let (batch, _) = batch_of(ex, rows, pad);
    scalar_at_last(params, &batch, tape)
}

/// Accuracy (ties count half), mean margin and mean rewards of a batch.
fn stats(eval: bool, rc: &[f32], rr: &[f32]) -> Vec<(&'static str, f64)> {
    let n = rc.len().max(1) as f64;
    let acc: f64 = rc
        .iter()
        .zip(rr)
        .map(|(c, r)| {
            if c > r {
                1.0
            } else if c == r {
                0.5
            } else {
                0.0
            }
        })
        .sum::<f64>()
        / n;
    let mc = rc.iter().map(|x| *x as f64).sum::<f64>() / n;
    let mr = rr.iter().map(|x| *x as f64).sum::<f64>() / n;
    if eval {
        vec![("eval_accuracy", acc), ("eval_margin", mc - mr)]
    } else {
        vec![
            ("accuracy", acc),
            ("margin", mc - mr),
            ("reward_chosen", mc),
            ("reward_rejected", mr),
        ]
    }
}

/// Every pair's (chosen, rejected) reward under `params`.
fn score_all(
    params: &LlamaParams<f32, Dev>,
    p: &RewardPairs,
    pad: usize,
    batch: usize,
) -> (Vec<f32>, Vec<f32>) {
    let rows: Vec<usize> = (0..p.pairs.len()).collect();
    let parts = workers::map_chunks(&rows, batch, |_, chunk| {
        (
            rewards(params, &p.pairs.chosen, chunk, pad, NoneTape).as_vec(),
            rewards(params, &p.pairs.rejected, chunk, pad, NoneTape).as_vec(),
        )
    });
    let (c, r): (Vec<Vec<f32>>, Vec<Vec<f32>>) = parts.into_iter().unzip();
    (c.concat(), r.concat())
}

/// Train a reward model from the model folder `init`; write it (with its
/// `score.weight`) and `metrics.parquet` into `out`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    init: &Path,
    data: &RewardPairs,
    eval: Option<&RewardPairs>,
    pad: usize,
    s: &TrainSettings,
    seed: u64,
    out: &Path,
    ckpt: &Checkpoints,
    progress: &ProgressBar,
) -> Result<Metrics, TrainError> {
    let dev = Dev::default();
    let mut params = checkpoint::load(init, &dev)?;
    if params.score.is_none() {
        // A zero head: every reward starts at 0, the loss at log 2.
        params.score = Some(dev.zeros_like(&(1, params.config.hidden_size)));
    }
    // A new reward model: an offset of the model it starts from no longer fits.
    params.config.reward_offset = None;
    let mut columns = vec![
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "accuracy",
        "margin",
        "reward_chosen",
        "reward_rejected",
    ];
    if eval.is_some() {
        columns.extend(["eval_loss", "eval_accuracy", "eval_margin"]);
    }
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 20);
    // Pairs by group, so a batch holds whole rankings.
    let mut groups: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
    for (i, g) in data.groups.iter().enumerate() {
        groups.entry(*g).or_default().push(i);
    }
    let groups: Vec<Vec<usize>> = groups.into_values().collect();
    let mut rng = Rng::fork(seed, "reward-batches");
    let evaluate = |p: &LlamaParams<f32, Dev>, e: &RewardPairs| {
        let (rc, rr) = score_all(p, e, pad, s.batch_size);
        let dev = Dev::default();
        let (tc, tr) = (
            dev.tensor_from_vec(rc.clone(), (rc.len(),)),
            dev.tensor_from_vec(rr.clone(), (rr.len(),)),
        );
        let loss = pairwise_loss(tc, tr, Some(&e.margins)).as_vec()[0] as f64;
        let mut m = vec![("eval_loss", loss)];
        m.extend(stats(true, &rc, &rr));
        m
    };
    let start = eval.map(|e| evaluate(&params, e));
    fit(
        &mut params,
        s,
        || {
            let mut rows = Vec::new();
            while rows.len() < s.batch_size {
                rows.extend(&groups[rng.below(groups.len())]);
            }
            rows
        },
        |p, rows| {
            let margins: Vec<f32> = rows.iter().map(|r| data.margins[*r]).collect();
            let rc = rewards(p, &data.pairs.chosen, rows, pad, OwnedTape::default());
            let rr = rewards(p, &data.pairs.rejected, rows, pad, OwnedTape::default());
            let extras = stats(false, &rc.as_vec(), &rr.as_vec());
            let tokens = rows
                .iter()
                .map(|r| data.pairs.chosen.tokens[*r].len() + data.pairs.rejected.tokens[*r].len())
                .sum();
            Ok(StepLoss {
                loss: pairwise_loss(rc, rr, Some(&margins)),
                tokens,
                units: rows.len() as f64,
                extras,
            })
        },
        |p| Ok(eval.map(|e| evaluate(p, e)).unwrap_or_default()),
        ckpt,
        &mut log,
        progress,
    )?;
    let mut metrics = super::finish(&params, log, out)?;
    if let Some(start) = start {
        metrics.extend(start.into_iter().map(|(k, v)| (format!("{k}_start"), v)));
    }
    Ok(metrics)
}
