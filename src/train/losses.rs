//! Training losses, one function each.

use dfdx::prelude::*;

use crate::model::kernels::Kernels;
use crate::model::llama::{token_logprobs, TokenBatch};
use crate::model::LlamaParams;

/// Weighted next-token negative log-likelihood (cross-entropy):
/// `-sum_t w_t log p(x_{t+1} | x_<=t) / sum_t w_t`, where `weights` is
/// (batch, seq) row-major and `w[b, t]` weights the prediction of token
/// t+1 (1 for trained tokens, 0 for prompt and padding).
pub fn lm_loss<D, T>(
    params: &LlamaParams<f32, D>,
    batch: &TokenBatch,
    weights: &[f32],
    tape: T,
) -> Tensor<(), f32, D, T>
where
    D: Kernels<f32>,
    T: Tape<f32, D> + Merge<T> + Merge<NoneTape>,
{
    let dev = params.embed_tokens.device().clone();
    let total: f32 = weights.iter().sum::<f32>().max(1.0);
    let w = dev.tensor_from_vec(weights.to_vec(), (batch.batch, batch.seq));
    (token_logprobs(params, batch, tape) * w).sum() * (-1.0 / total)
}

/// Weights that train on every real next token (pre-training).
pub fn all_next_tokens(batch: &TokenBatch) -> Vec<f32> {
    let s = batch.seq;
    (0..batch.batch * s)
        .map(|i| {
            let t = i % s;
            f32::from(u8::from(t + 1 < s && batch.mask[i + 1]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_model_loss_is_log_vocab() {
        // All-zero weights give uniform next-token distributions: loss = ln V.
        let cfg = crate::model::LlamaConfig::tiny(13, 8, 1, 2, 2);
        let dev = Cpu::default();
        let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 0, &dev);
        for (_, t) in p.named_mut() {
            let n = t.shape().0 * t.shape().1;
            t.copy_from(&vec![0.0; n]);
        }
        let b = TokenBatch::right_padded(&[vec![1, 2, 3, 4], vec![5, 6]], 0);
        let w = all_next_tokens(&b);
        assert_eq!(w, [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        let loss = lm_loss(&p, &b, &w, NoneTape).array();
        assert!((loss - 13f32.ln()).abs() < 1e-5, "{loss}");
    }
}
