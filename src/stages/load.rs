//! `load`: a pre-trained model from a Hugging Face Llama folder
//! (`config.json`, `*.safetensors`, `tokenizer.json`), checked tensor by
//! tensor and written back as posttrain's model folder. The folder's files
//! are hashed by content, like any dataset.
//!
//! ```toml
//! [stages.base]
//! kind = "load"
//! path = "models/my-llama"
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{copy_tokenizer, model_outputs, TOKENIZER_FILE};
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
    const RECIPE_VERSION: u32 = 1;
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
        let config = checkpoint::normalize(&src, ctx.out_dir)?;
        let tok_path = src.join(TOKENIZER_FILE);
        if !tok_path.exists() {
            return Err(StageError::Failed(format!(
                "{}: no {TOKENIZER_FILE}; posttrain needs the model's tokenizer",
                src.display()
            )));
        }
        let tok = tokenize::load_tokenizer(&tok_path)?;
        if tok.tokenizer.get_vocab_size(true) > config.vocab_size {
            return Err(StageError::Failed(format!(
                "{}: the tokenizer has {} tokens but the model only {} embeddings",
                src.display(),
                tok.tokenizer.get_vocab_size(true),
                config.vocab_size
            )));
        }
        copy_tokenizer(&tok_path, ctx.out_dir)?;
        // The folder has no training log; an empty one keeps the outputs uniform.
        crate::train::metrics::MetricsLog::create(&ctx.out("metrics.parquet"), &[], 1).finish()?;
        let mut metrics = Metrics::new();
        metrics.insert("parameters".into(), config.parameter_count() as f64);
        Ok(metrics)
    }
}
