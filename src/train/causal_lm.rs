//! Next-token training of a Llama on token sequences: pre-training on a
//! packed corpus and supervised finetuning on demonstrations differ only
//! in which tokens carry loss. The interface is plain token ids, so stage
//! code never sees a dfdx type.

use std::path::Path;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use super::losses::lm_loss;
use super::metrics::MetricsLog;
use super::optim::TrainSettings;
use super::resume::Checkpoints;
use super::{fit, StepLoss, TrainError};
use crate::data::rng::Rng;
use crate::model::llama::TokenBatch;
use crate::model::{checkpoint, workers, Dev, LlamaConfig, LlamaParams};
use crate::stages::Metrics;

/// Token sequences and, per token, whether predicting it is trained.
#[derive(Debug, Clone, Default)]
pub struct LmExamples {
    pub tokens: Vec<Vec<u32>>,
    pub trained: Vec<Vec<bool>>,
}

impl LmExamples {
    pub fn len(&self) -> usize {
        self.tokens.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
    /// Tokens that carry loss, in all examples.
    pub fn trained_tokens(&self) -> usize {
        self.trained
            .iter()
            .map(|t| t.iter().filter(|x| **x).count())
            .sum()
    }
}

/// Training and held-out examples, and the padding token id.
pub struct LmData<'a> {
    pub train: &'a LmExamples,
    pub eval: Option<&'a LmExamples>,
    pub pad: usize,
}

/// Where the model starts.
pub enum Init<'a> {
    Random { config: Box<LlamaConfig>, seed: u64 },
    Load(&'a Path),
}

/// A right-padded batch and its loss weights (weight at t trains token t+1).
pub(crate) fn batch_of(
    examples: &LmExamples,
    rows: &[usize],
    pad: usize,
) -> (TokenBatch, Vec<f32>) {
    let seqs: Vec<Vec<usize>> = rows
        .iter()
        .map(|r| examples.tokens[*r].iter().map(|t| *t as usize).collect())
        .collect();
    let batch = TokenBatch::right_padded(&seqs, pad);
    let s = batch.seq;
    let mut weights = vec![0.0f32; batch.batch * s];
    for (b, r) in rows.iter().enumerate() {
        for (t, trained) in examples.trained[*r].iter().enumerate().skip(1) {
            if *trained {
                weights[b * s + t - 1] = 1.0;
            }
        }
    }
    (batch, weights)
}

/// Mean loss per trained token over all examples, in batches.
fn evaluate(
    params: &LlamaParams<f32, Dev>,
    examples: &LmExamples,
    batch_size: usize,
    pad: usize,
) -> f64 {
    let rows: Vec<usize> = (0..examples.len()).collect();
    let parts = workers::map_chunks(&rows, batch_size, |_, chunk| {
        let (batch, weights) = batch_of(examples, chunk, pad);
        let n: f32 = weights.iter().sum();
        if n == 0.0 {
            return (0.0, 0.0);
        }
        let loss = lm_loss(params, &batch, &weights, NoneTape).as_vec()[0] as f64;
        (loss * n as f64, n as f64)
    });
    let (total, count) = parts
        .iter()
        .fold((0.0f64, 0.0f64), |(t, c), (pt, pc)| (t + pt, c + pc));
    total / count.max(1.0)
}

/// Train and write the model folder (`config.json`, `model.safetensors`)
/// and `metrics.parquet` into `out`; return the final metrics.
pub fn train(
    init: Init,
    data: LmData,
    s: &TrainSettings,
    seed: u64,
    out: &Path,
    ckpt: &Checkpoints,
    progress: &ProgressBar,
) -> Result<Metrics, TrainError> {
    let (train_data, eval_data, pad) = (data.train, data.eval, data.pad);
    let dev = Dev::default();
    let mut params = match init {
        Init::Random { config, seed } => LlamaParams::<f32, Dev>::init(&config, false, seed, &dev),
        Init::Load(dir) => checkpoint::load(dir, &dev)?,
    };
    let mut columns = vec!["loss", "lr", "grad_norm", "tokens_per_s"];
    if eval_data.is_some() {
        columns.extend(["eval_loss", "eval_perplexity"]);
    }
    let mut log = MetricsLog::create(&out.join("metrics.parquet"), &columns, 20);
    let mut rng = Rng::fork(seed, "batches");
    let first_eval = eval_data.map(|e| evaluate(&params, e, s.batch_size, pad));

    fit(
        &mut params,
        s,
        || {
            (0..s.batch_size)
                .map(|_| rng.below(train_data.len()))
                .collect()
        },
        |p, rows| {
            let (batch, weights) = batch_of(train_data, rows, pad);
            let tokens = weights.iter().filter(|w| **w > 0.0).count();
            Ok(StepLoss {
                loss: lm_loss(p, &batch, &weights, OwnedTape::default()),
                tokens,
                // lm_loss is a mean over the trained tokens.
                units: tokens as f64,
                extras: Vec::new(),
            })
        },
        |p| {
            Ok(match eval_data {
                Some(e) => {
                    let loss = evaluate(p, e, s.batch_size, pad);
                    vec![("eval_loss", loss), ("eval_perplexity", loss.exp())]
                }
                None => Vec::new(),
            })
        },
        ckpt,
        &mut log,
        progress,
    )?;
    let mut metrics = super::finish(&params, log, out)?;
    if let Some(first) = first_eval {
        metrics.insert("eval_loss_start".into(), first);
    }
    metrics.insert("parameters".into(), params.config.parameter_count() as f64);
    Ok(metrics)
}
