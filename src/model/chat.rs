//! Answering prompts with a model folder: the chat template in, sampled
//! text out. A plain-text interface, so the CLI and stages never see dfdx.

use std::path::Path;

use super::checkpoint::{self, CheckpointError};
use super::generate::{generate, SampleSettings};
use super::Dev;
use crate::chat::tokenizer::{load_folder, TemplateChoice};
use crate::chat::{LoadedTokenizer, Message};

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error("cannot encode or decode text: {0}")]
    Tokenizer(String),
}

/// A loaded model folder ready to answer.
pub struct ChatModel {
    params: super::LlamaParams<f32, Dev>,
    tokenizer: LoadedTokenizer,
}

/// One answer and whether it ended with a stop token (rather than
/// running into `max_new_tokens`).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub text: String,
    pub finished: bool,
    pub tokens: usize,
}

impl ChatModel {
    /// A model folder with the chat template `choice` picks.
    pub fn load(dir: &Path, choice: &TemplateChoice) -> Result<ChatModel, ChatError> {
        let params = checkpoint::load(dir, &Dev::default())?;
        let tokenizer = load_folder(dir, choice)?;
        Ok(ChatModel { params, tokenizer })
    }

    /// Which template renders the prompts.
    pub fn template_name(&self) -> String {
        self.tokenizer.template_name()
    }

    /// Answer each prompt (one user turn each), batched.
    pub fn answer(
        &self,
        prompts: &[String],
        s: &SampleSettings,
        seed: u64,
    ) -> Result<Vec<Answer>, ChatError> {
        let tok = &self.tokenizer;
        let encoded: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                let text = tok.render_prompt(&[Message::user(p)])?;
                Ok(tok.encode(&text)?.into_iter().map(|i| i as usize).collect())
            })
            .collect::<Result<_, crate::chat::ChatError>>()?;
        let stops: Vec<usize> = tok.stops.iter().map(|t| *t as usize).collect();
        let out = generate(
            &self.params,
            &encoded,
            &stops,
            tok.pad as usize,
            s,
            seed,
            true,
        );
        out.into_iter()
            .map(|mut ids| {
                let finished = ids.last().is_some_and(|t| stops.contains(t));
                if finished {
                    ids.pop();
                }
                let ids32: Vec<u32> = ids.iter().map(|i| *i as u32).collect();
                Ok(Answer {
                    text: tok.decode(&ids32)?,
                    finished,
                    tokens: ids.len(),
                })
            })
            .collect()
    }
}
