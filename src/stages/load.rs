//! `load`: a pre-trained model from a Hugging Face folder (`config.json`,
//! `*.safetensors`, `tokenizer.json`, and where it has them
//! `tokenizer_config.json` / `chat_template.jinja` /
//! `generation_config.json`) or a GGUF file (llama.cpp's and Ollama's
//! format: metadata, vocabulary, chat template and quantized tensors in
//! one file), checked tensor by tensor and written as posttrain's model
//! folder (f32 safetensors, config.json in transformers v5's layout). The
//! source is hashed by content, like any dataset.
//!
//! A model with its own chat template keeps it: no tokens are added and no
//! embeddings grown; every downstream stage renders conversations with it.
//! A model without one gets posttrain's template tokens added, the
//! embeddings (and an untied head) growing to cover their ids, new rows
//! starting at the mean embedding; finetune before expecting the model to
//! use them.
//!
//! ```toml
//! [stages.base]
//! kind = "load"
//! path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"   # or a Hugging Face folder
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::model_files::{model_outputs, TOKENIZER_FILE};
use super::{Input, InputTarget, Metrics, StageContext, StageError, StageKind};
use crate::chat::gguf_vocab;
use crate::chat::tokenizer::{self as chat_tokenizer, FolderFormat};
use crate::data::tokenize;
use crate::gguf::GgufFile;
use crate::model::checkpoint::Imported;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSettings {
    /// A Hugging Face Llama-family folder or a `.gguf` file, relative to
    /// the project root. Required.
    pub path: String,
}

impl StageKind for LoadSettings {
    const KIND: &'static str = "load";
    const RECIPE_VERSION: u32 = 3;
    const SUMMARY: &'static str = "load a Hugging Face model folder or a GGUF file";

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
        let (params, format, tokenizer_json) = if self.path.ends_with(".gguf") {
            read_gguf(&src)?
        } else {
            read_folder(&src)?
        };
        if let Some((tensor, value)) = params.first_non_finite() {
            return Err(StageError::Failed(format!(
                "{}: tensor `{tensor}` holds a non-finite weight ({value}); a model with NaN or infinite weights is not loaded (re-download or re-export it)",
                src.display()
            )));
        }
        let out = ctx.out(TOKENIZER_FILE);
        let model_vocab = params.config().vocab_size;
        let (params, added) = if format.template.is_some() {
            // The model's own template: the tokenizer as it is.
            std::fs::write(&out, &tokenizer_json).map_err(StageError::io(&out))?;
            format.write(ctx.out_dir)?;
            chat_tokenizer::load_folder(ctx.out_dir, &chat_tokenizer::TemplateChoice::Model)?;
            (params, 0)
        } else {
            with_posttrain_tokens(params, &src, &tokenizer_json, &out)?
        };
        params.save(ctx.out_dir)?;
        let config = params.config();
        // The folder has no training log; an empty one keeps the outputs uniform.
        crate::train::metrics::MetricsLog::create(&ctx.out("metrics.parquet"), &[], 1).finish()?;
        let mut metrics = Metrics::new();
        metrics.insert("parameters".into(), config.parameter_count() as f64);
        metrics.insert("added_tokens".into(), added as f64);
        metrics.insert(
            "added_embeddings".into(),
            config.vocab_size.saturating_sub(model_vocab) as f64,
        );
        Ok(metrics)
    }
}

type Loaded = (Imported, FolderFormat, String);

fn read_folder(src: &Path) -> Result<Loaded, StageError> {
    let tok_path = src.join(TOKENIZER_FILE);
    if !tok_path.exists() {
        return Err(StageError::Failed(format!(
            "{}: no {TOKENIZER_FILE}; posttrain needs the model's tokenizer",
            src.display()
        )));
    }
    let params = Imported::from_folder(src)?;
    let format = FolderFormat::read(src)?;
    let json = std::fs::read_to_string(&tok_path).map_err(StageError::io(&tok_path))?;
    Ok((params, format, json))
}

fn read_gguf(src: &Path) -> Result<Loaded, StageError> {
    let file = GgufFile::open(src).map_err(|e| StageError::Failed(e.to_string()))?;
    let params = Imported::from_gguf(&file)?;
    let json = gguf_vocab::tokenizer_json(&file)?;
    let format = gguf_vocab::chat_format(&file)?;
    Ok((params, format, json))
}

/// posttrain's template tokens added where missing, and the embeddings
/// grown to cover their ids; returns how many tokens were added.
fn with_posttrain_tokens(
    mut params: Imported,
    src: &Path,
    tokenizer_json: &str,
    out: &Path,
) -> Result<(Imported, usize), StageError> {
    std::fs::write(out, tokenizer_json).map_err(StageError::io(out))?;
    let tok = tokenize::with_chat_tokens(out)?;
    let model_vocab = params.config().vocab_size;
    if tok.vocab_before > model_vocab {
        return Err(StageError::Failed(format!(
            "{}: the tokenizer has {} tokens but the model only {model_vocab} embeddings",
            src.display(),
            tok.vocab_before
        )));
    }
    if !tok.added.is_empty() {
        std::fs::write(out, &tok.json).map_err(StageError::io(out))?;
    }
    tokenize::load_tokenizer(out)?;
    params.grow_vocab(tok.vocab_after);
    Ok((params, tok.added.len()))
}
