//! Rollouts for the online methods (PPO, GRPO, RLOO): sampling responses
//! from the policy, laying prompt + response out as one batch with the
//! columns that predict each response token, and the per-token
//! log-probabilities (and entropies) of any model on them. Each method's
//! estimator (GAE with a value model, group-relative, leave-one-out) sits
//! on top of this; none of them copies it.

use dfdx::prelude::*;

use crate::model::generate::{generate, SampleSettings};
use crate::model::llama::{logits, TokenBatch};
use crate::model::{workers, Dev, LlamaParams};

/// Sampled responses as one right-padded batch.
pub struct Samples {
    pub batch: TokenBatch,
    /// For each row, the flat (B * S) index of the column whose prediction
    /// is each response token (the token's position minus one).
    pub columns: Vec<Vec<usize>>,
    /// Whether each response ended with a stop token.
    pub finished: Vec<bool>,
}

/// One response per prompt (stop tokens kept, as sampled); the batch's
/// halves sample at once, each its own seeded stream.
pub fn sample(
    policy: &LlamaParams<f32, Dev>,
    prompts: &[Vec<usize>],
    stops: &[usize],
    pad: usize,
    sampling: &SampleSettings,
    seed: u64,
) -> Samples {
    let half = prompts.len().div_ceil(workers::WORKERS);
    let responses: Vec<Vec<usize>> = workers::map_chunks(prompts, half, |i, half| {
        let half_seed = seed ^ (i as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
        generate(policy, half, stops, pad, sampling, half_seed, true)
    })
    .concat();
    let finished: Vec<bool> = responses
        .iter()
        .map(|r| r.last().is_some_and(|t| stops.contains(t)))
        .collect();
    let rows: Vec<Vec<usize>> = prompts
        .iter()
        .zip(&responses)
        .map(|(p, r)| [p.as_slice(), r.as_slice()].concat())
        .collect();
    let batch = TokenBatch::right_padded(&rows, pad);
    let s = batch.seq;
    let columns: Vec<Vec<usize>> = prompts
        .iter()
        .zip(&rows)
        .enumerate()
        .map(|(b, (p, row))| (p.len() - 1..row.len() - 1).map(|t| b * s + t).collect())
        .collect();
    Samples {
        batch,
        columns,
        finished,
    }
}

/// Per-token log-probs of the next tokens and per-token entropies, (B*S) each.
pub fn logprobs_and_entropy(
    params: &LlamaParams<f32, Dev>,
    batch: &TokenBatch,
) -> (Vec<f32>, Vec<f32>) {
    let (b, s) = (batch.batch, batch.seq);
    let v = params.config.vocab_size;
    let lp = logits(params, batch, NoneTape)
        .log_softmax::<Axis<2>>()
        .as_vec();
    let mut logp = Vec::with_capacity(b * s);
    let mut entropy = Vec::with_capacity(b * s);
    for (i, row) in lp.chunks(v).enumerate() {
        let next = if i % s + 1 < s { batch.ids[i + 1] } else { 0 };
        logp.push(row[next]);
        entropy.push(-row.iter().map(|l| l.exp() * l).sum::<f32>());
    }
    (logp, entropy)
}

/// The values at some flat columns.
pub fn pick(flat: &[f32], columns: &[usize]) -> Vec<f32> {
    columns.iter().map(|c| flat[*c]).collect()
}

/// The rows `rows` of a rollout batch as their own batch, with the flat
/// columns of their response tokens in it.
pub fn sub_batch(
    batch: &TokenBatch,
    columns: &[Vec<usize>],
    rows: &[usize],
) -> (TokenBatch, Vec<usize>) {
    let s = batch.seq;
    let mut ids = Vec::with_capacity(rows.len() * s);
    let mut mask = Vec::with_capacity(rows.len() * s);
    let mut cols = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        ids.extend_from_slice(&batch.ids[row * s..(row + 1) * s]);
        mask.extend_from_slice(&batch.mask[row * s..(row + 1) * s]);
        cols.extend(columns[*row].iter().map(|c| c - row * s + i * s));
    }
    (
        TokenBatch {
            ids,
            mask,
            batch: rows.len(),
            seq: s,
        },
        cols,
    )
}

/// Per-row values of some rows, concatenated.
pub fn gather_rows(rows: &[usize], per_row: &[Vec<f32>]) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| per_row[*r].iter().copied())
        .collect()
}
