//! `load`: a pre-trained model from a Hugging Face Llama folder
//! (`config.json`, `*.safetensors`, `tokenizer.json`), checked tensor by
//! tensor and written back as posttrain's model folder. The folder's files
//! are hashed by content, like any dataset. A tokenizer without the chat
//! template's special tokens (a real Llama tokenizer has none) gets them
//! added, and the embeddings (and an untied head) grow to cover their ids,
//! new rows starting at the mean embedding; finetune before expecting the
//! model to use them.
//!
//! ```toml
//! [stages.base]
//! kind = "load"
//! path = "models/my-llama"
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{model_outputs, TOKENIZER_FILE};
use super::{Input, InputTarget, Metrics, StageContext, StageError, StageKind};
use crate::data::tokenize;
use crate::model::checkpoint;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSettings {
    /// A Hugging Face Llama folder, relative to the project root. Required.
    pub path: String,
}

impl StageKind for LoadSettings {
    const KIND: &'static str = "load";
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "load a Hugging Face Llama model folder";

    fn inputs(&self) -> Vec<Input> {
        vec![Input {
            field: "path".into(),
            pointer: "/path".into(),
            target: InputTarget::Path(self.path.clone()),
        }]
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let src = ctx.root.join(&self.path);
        let tok_path = src.join(TOKENIZER_FILE);
        if !tok_path.exists() {
            return Err(StageError::Failed(format!(
                "{}: no {TOKENIZER_FILE}; posttrain needs the model's tokenizer",
                src.display()
            )));
        }
        let model_vocab = checkpoint::read_config(&src)?.vocab_size;
        // The chat template's tokens are added where missing, and the
        // embeddings grow to cover their ids.
        let tok = tokenize::with_chat_tokens(&tok_path)?;
        if tok.vocab_before > model_vocab {
            return Err(StageError::Failed(format!(
                "{}: the tokenizer has {} tokens but the model only {model_vocab} embeddings",
                src.display(),
                tok.vocab_before
            )));
        }
        let config = checkpoint::normalize(&src, ctx.out_dir, tok.vocab_after)?;
        let out = ctx.out(TOKENIZER_FILE);
        if tok.added.is_empty() {
            // Unchanged: the file as it was, byte for byte.
            std::fs::copy(&tok_path, &out).map_err(StageError::io(&out))?;
        } else {
            std::fs::write(&out, &tok.json).map_err(StageError::io(&out))?;
        }
        tokenize::load_tokenizer(&out)?;
        // The folder has no training log; an empty one keeps the outputs uniform.
        crate::train::metrics::MetricsLog::create(&ctx.out("metrics.parquet"), &[], 1).finish()?;
        let mut metrics = Metrics::new();
        metrics.insert("parameters".into(), config.parameter_count() as f64);
        metrics.insert("added_tokens".into(), tok.added.len() as f64);
        metrics.insert(
            "added_embeddings".into(),
            config.vocab_size.saturating_sub(model_vocab) as f64,
        );
        Ok(metrics)
    }
}
