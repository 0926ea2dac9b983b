//! Per-token log-probabilities and perplexity of text under a model folder,
//! through a plain-types interface (for `posttrain score` and eval code).

use std::path::Path;

use dfdx::prelude::*;

use super::chat::ChatError;
use super::checkpoint;
use super::llama::{token_logprobs, TokenBatch};
use super::{Dev, LlamaParams};

pub struct Scorer {
    params: LlamaParams<f32, Dev>,
    tokenizer: Option<tokenizers::Tokenizer>,
}

impl Scorer {
    /// Load a model folder; its tokenizer.json is optional (raw ids need none).
    pub fn load(dir: &Path) -> Result<Scorer, ChatError> {
        let params = checkpoint::load(dir, &Dev::default())?;
        let path = dir.join("tokenizer.json");
        let tokenizer = if path.exists() {
            Some(
                tokenizers::Tokenizer::from_file(&path)
                    .map_err(|e| ChatError::Tokenizer(format!("{}: {e}", path.display())))?,
            )
        } else {
            None
        };
        Ok(Scorer { params, tokenizer })
    }

    pub fn vocab_size(&self) -> usize {
        self.params.config.vocab_size
    }

    /// Token ids of text (no special tokens added); needs the tokenizer.
    pub fn encode(&self, text: &str) -> Result<Vec<usize>, ChatError> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            ChatError::Tokenizer(
                "the model folder has no tokenizer.json: pass --ids instead".into(),
            )
        })?;
        let enc = tok
            .encode(text, false)
            .map_err(|e| ChatError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|i| *i as usize).collect())
    }

    /// log p(ids[t] | ids[..t]) for t >= 1, in windows of at most the
    /// model's `max_position_embeddings` tokens.
    pub fn logprobs(&self, ids: &[usize]) -> Vec<f32> {
        let window = self.params.config.max_position_embeddings.max(2);
        let mut out = Vec::with_capacity(ids.len().saturating_sub(1));
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + window).min(ids.len());
            let batch = TokenBatch::right_padded(&[ids[start..end].to_vec()], 0);
            let lp = token_logprobs(&self.params, &batch, NoneTape).as_vec();
            out.extend_from_slice(&lp[..end - start - 1]);
            // The next window starts at this window's last token, so every
            // token after the first is predicted exactly once.
            start = end - 1;
        }
        out
    }
}
