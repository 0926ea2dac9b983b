//! A model folder that is only run, never trained: sampling, log-probs of
//! responses and scalar-head scores, through plain types (token ids in,
//! numbers out) so the eval and best-of-N stages never see dfdx.

use std::path::Path;

use dfdx::prelude::*;

use super::checkpoint::{self, CheckpointError};
use super::generate::{generate, SampleSettings};
use super::llama::{reward_scores, token_logprobs, TokenBatch};
use super::{workers, Dev, LlamaParams};

pub struct FrozenModel {
    params: LlamaParams<f32, Dev>,
}

/// One sampled answer: its tokens (the stop token excluded), whether it
/// ended with a stop token rather than at `max_new_tokens`, and which.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub ids: Vec<usize>,
    pub finished: bool,
    pub stop: Option<usize>,
}

impl Sampled {
    /// From a continuation as [`generate`] returns it (stop token last).
    pub fn from_generated(mut ids: Vec<usize>, stops: &[usize]) -> Sampled {
        let stop = ids.last().copied().filter(|t| stops.contains(t));
        if stop.is_some() {
            ids.pop();
        }
        Sampled {
            ids,
            finished: stop.is_some(),
            stop,
        }
    }

    /// The answer as sampled: its tokens and, when it ended, the stop token.
    pub fn with_stop(&self) -> Vec<usize> {
        let mut ids = self.ids.clone();
        ids.extend(self.stop);
        ids
    }

    /// Prompt + answer as sampled: what a reward model scores.
    pub fn sequence(&self, prompt: &[usize]) -> Vec<usize> {
        [prompt, self.with_stop().as_slice()].concat()
    }
}

/// The seed of the `index`-th batch of a sampling run: batches are
/// independent streams, so a prompt's samples do not depend on how many
/// batches came before it had other lengths.
fn batch_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl FrozenModel {
    pub fn load(dir: &Path) -> Result<FrozenModel, CheckpointError> {
        Ok(FrozenModel {
            params: checkpoint::load(dir, &Dev::default())?,
        })
    }

    /// Whether the folder holds a scalar head (a reward or value model).
    pub fn has_score_head(&self) -> bool {
        self.params.score.is_some()
    }

    /// Sample one continuation of each prompt (the stop token that ended
    /// it last), in batches of `batch` prompts.
    pub fn generate(
        &self,
        prompts: &[Vec<usize>],
        stops: &[usize],
        pad: usize,
        s: &SampleSettings,
        seed: u64,
        batch: usize,
    ) -> Vec<Vec<usize>> {
        workers::map_chunks(prompts, batch, |i, chunk| {
            generate(
                &self.params,
                chunk,
                stops,
                pad,
                s,
                batch_seed(seed, i),
                true,
            )
        })
        .concat()
    }

    /// `k` answers to each prompt, answer j of prompt i at `i * k + j`.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        prompts: &[Vec<usize>],
        k: usize,
        stops: &[usize],
        pad: usize,
        s: &SampleSettings,
        seed: u64,
        batch: usize,
    ) -> Vec<Sampled> {
        let repeated: Vec<Vec<usize>> = prompts
            .iter()
            .flat_map(|p| std::iter::repeat_n(p.clone(), k))
            .collect();
        self.generate(&repeated, stops, pad, s, seed, batch)
            .into_iter()
            .map(|ids| Sampled::from_generated(ids, stops))
            .collect()
    }

    /// log p(response[j] | prompt, response[..j]) for every response token.
    pub fn response_logprobs(
        &self,
        pairs: &[(&[usize], &[usize])],
        pad: usize,
        batch: usize,
    ) -> Vec<Vec<f32>> {
        workers::map_chunks(pairs, batch, |_, chunk| {
            let rows: Vec<Vec<usize>> = chunk.iter().map(|(p, r)| [*p, *r].concat()).collect();
            let tb = TokenBatch::right_padded(&rows, pad);
            let lp = token_logprobs(&self.params, &tb, NoneTape).as_vec();
            chunk
                .iter()
                .enumerate()
                .map(|(r, (p, resp))| {
                    // The log-prob of token t sits at column t - 1.
                    let start = r * tb.seq + p.len() - 1;
                    lp[start..start + resp.len()].to_vec()
                })
                .collect::<Vec<_>>()
        })
        .concat()
    }

    /// The scalar head at each sequence's last token (a reward model's
    /// score), plus the model's `reward_offset` when it has one.
    pub fn scores(&self, sequences: &[Vec<usize>], pad: usize, batch: usize) -> Vec<f32> {
        assert!(self.has_score_head(), "scores() needs a score head");
        workers::map_chunks(sequences, batch, |_, chunk| {
            reward_scores(&self.params, &TokenBatch::right_padded(chunk, pad))
        })
        .concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LlamaConfig;

    fn model(with_score: bool) -> FrozenModel {
        let mut cfg = LlamaConfig::tiny(19, 16, 2, 4, 2);
        cfg.intermediate_size = 24;
        FrozenModel {
            params: LlamaParams::init(&cfg, with_score, 3, &Dev::default()),
        }
    }

    #[test]
    fn response_logprobs_do_not_depend_on_batching() {
        let m = model(false);
        let p1 = [3usize, 4, 5];
        let r1 = [6usize, 7];
        let p2 = [8usize];
        let r2 = [9usize, 10, 11, 12];
        let together = m.response_logprobs(&[(&p1, &r1), (&p2, &r2)], 0, 8);
        let alone = m.response_logprobs(&[(&p2, &r2)], 0, 8);
        assert_eq!(together[0].len(), 2);
        assert_eq!(together[1].len(), 4);
        for (a, b) in together[1].iter().zip(&alone[0]) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(together.iter().flatten().all(|x| *x < 0.0));
    }

    #[test]
    fn scores_read_the_last_token_and_batching_is_invisible() {
        let m = model(true);
        let seqs = vec![vec![1, 2, 3], vec![4, 5], vec![6]];
        let all = m.scores(&seqs, 0, 2);
        let one = m.scores(&seqs[1..2], 0, 1);
        assert_eq!(all.len(), 3);
        assert!((all[1] - one[0]).abs() < 1e-5);
    }
}
