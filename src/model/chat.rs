//! Answering prompts with a model folder: the chat template in, sampled
//! text out. A plain-text interface, so the CLI and stages never see dfdx.

use std::path::Path;

use super::checkpoint::{self, CheckpointError};
use super::generate::{generate, SampleSettings};
use super::Dev;
use crate::data::chat::{self, END_OF_TURN, PAD};
use crate::data::formats::Message;
use crate::data::tokenize::{self, LoadedTokenizer};
use crate::data::DataError;

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("cannot encode or decode text: {0}")]
    Tokenizer(String),
}

/// A loaded model folder ready to answer.
pub struct ChatModel {
    params: super::LlamaParams<f32, Dev>,
    tokenizer: LoadedTokenizer,
}

/// One answer and whether it ended with the end-of-turn token (rather
/// than running into `max_new_tokens`).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub finished: bool,
    pub tokens: usize,
}

impl ChatModel {
    pub fn load(dir: &Path) -> Result<ChatModel, ChatError> {
        let params = checkpoint::load(dir, &Dev::default())?;
        let tokenizer = tokenize::load_tokenizer(&dir.join("tokenizer.json"))?;
        Ok(ChatModel { params, tokenizer })
    }

    /// Answer each prompt (one user turn each), batched.
    pub fn answer(
        &self,
        prompts: &[String],
        s: &SampleSettings,
        seed: u64,
    ) -> Result<Vec<Answer>, ChatError> {
        let tok = &self.tokenizer.tokenizer;
        let id = |t: &str| tok.token_to_id(t).expect("checked when loaded") as usize;
        let encoded: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                let text = chat::render_prompt(&[Message::user(p)]);
                tok.encode(text, false)
                    .map(|e| e.get_ids().iter().map(|i| *i as usize).collect())
                    .map_err(|e| ChatError::Tokenizer(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let out = generate(
            &self.params,
            &encoded,
            Some(id(END_OF_TURN)),
            id(PAD),
            s,
            seed,
            true,
        );
        out.into_iter()
            .map(|ids| {
                let ids32: Vec<u32> = ids.iter().map(|i| *i as u32).collect();
                let text = tok
                    .decode(&ids32, false)
                    .map_err(|e| ChatError::Tokenizer(e.to_string()))?;
                Ok(Answer {
                    text,
                    finished: ids.len() < s.max_new_tokens,
                    tokens: ids.len(),
                })
            })
            .collect()
    }
}
