//! `tokenizer`: train a byte-level BPE tokenizer (GPT-2 style, with the
//! tokenizers crate) on a corpus's text column, with the chat template's
//! special tokens. Writes `tokenizer.json`, loadable by any Hugging Face
//! tokenizer.
//!
//! ```toml
//! [stages.tokenizer]
//! kind = "tokenizer"
//! corpus = { stage = "world", file = "corpus.parquet" }   # required
//! vocab_size = 512
//! ```

use serde::{Deserialize, Serialize};

use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind};
use crate::chat::builtin as chat;
use crate::data::{formats, tokenize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerSettings {
    /// The training text: a corpus with a `text` column (rename another
    /// column with `columns = { text = "body" }`, cap with `max_rows`). Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub corpus: DataSource,
    /// Vocabulary size including the 256 byte tokens and the special
    /// tokens. Default 512.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// A pair must occur this often to be merged. Default 2.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
}

fn default_vocab_size() -> usize {
    512
}
fn default_min_frequency() -> u64 {
    2
}

impl StageKind for TokenizerSettings {
    const KIND: &'static str = "tokenizer";
    // 2: a <|system|> special token.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "train a byte-level BPE tokenizer on a corpus";

    fn inputs(&self) -> Vec<Input> {
        vec![Input::data("corpus", &self.corpus)]
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let min = 256 + chat::SPECIAL_TOKENS.len();
        if self.vocab_size < min || self.vocab_size > 1 << 20 {
            return Err((
                "vocab_size".into(),
                format!(
                    "must be between {min} (bytes + special tokens) and {}, got {}",
                    1 << 20,
                    self.vocab_size
                ),
            ));
        }
        Ok(())
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec!["tokenizer.json".into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (df, path) = ctx.load(&self.corpus)?;
        let texts = formats::load_corpus(&df, &path)?;
        ctx.progress
            .set_message(format!("training BPE on {} documents", texts.len()));

        let json = tokenize::train_bpe(&texts, self.vocab_size, self.min_frequency)?;
        let out = ctx.out("tokenizer.json");
        std::fs::write(&out, &json).map_err(StageError::io(&out))?;
        let tokenizer = tokenize::load_tokenizer(&out)?.tokenizer;

        // How well it compresses the corpus: bytes per token.
        let sample: Vec<&String> = texts.iter().take(500).collect();
        let (mut bytes, mut tokens) = (0usize, 0usize);
        for text in &sample {
            let enc = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| StageError::Failed(format!("cannot encode: {e}")))?;
            bytes += text.len();
            tokens += enc.len();
        }
        let mut metrics = Metrics::new();
        metrics.insert("vocab_size".into(), tokenizer.get_vocab_size(true) as f64);
        metrics.insert("documents".into(), texts.len() as f64);
        metrics.insert(
            "bytes_per_token".into(),
            bytes as f64 / tokens.max(1) as f64,
        );
        Ok(metrics)
    }
}
