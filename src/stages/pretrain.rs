//! `pretrain`: a randomly initialised Llama trained on next-token
//! prediction over a packed corpus: completion, not conversation.
//!
//! ```toml
//! [stages.base]
//! kind = "pretrain"
//! tokenizer = "tokenizer"                                   # a tokenizer stage
//! corpus = { stage = "world", file = "corpus.parquet" }
//! model = { hidden_size = 64, num_hidden_layers = 2 }
//! train = { steps = 300, lr = 3e-3 }
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{copy_tokenizer, model_outputs, pad_id, upstream_tokenizer};
use super::token_data::pack_corpus;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::data::{formats, prepare};
use crate::model::config::RopeParameters;
use crate::model::LlamaConfig;
use crate::train::causal_lm::{self, Init, LmData, LmExamples};
use crate::train::optim::TrainSettings;

/// The architecture of a new model (the vocabulary comes from the tokenizer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSettings {
    /// Default 64.
    pub hidden_size: usize,
    /// Default 2.
    pub num_hidden_layers: usize,
    /// Default 4.
    pub num_attention_heads: usize,
    /// Default 2 (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Default 176.
    pub intermediate_size: usize,
    /// Default 10000.
    pub rope_theta: f64,
    /// Default 1e-5.
    pub rms_norm_eps: f64,
    /// Default false.
    pub tie_word_embeddings: bool,
}

impl Default for ModelSettings {
    fn default() -> Self {
        ModelSettings {
            hidden_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 176,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
        }
    }
}

impl ModelSettings {
    pub fn config(&self, vocab_size: usize, max_positions: usize) -> LlamaConfig {
        LlamaConfig {
            intermediate_size: self.intermediate_size,
            max_position_embeddings: max_positions,
            rope: RopeParameters::theta(self.rope_theta),
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            ..LlamaConfig::tiny(
                vocab_size,
                self.hidden_size,
                self.num_hidden_layers,
                self.num_attention_heads,
                self.num_key_value_heads,
            )
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSettings {
    /// A tokenizer stage. Required.
    pub tokenizer: StageRef,
    /// A corpus (`text` column). Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub corpus: DataSource,
    #[serde(default)]
    pub model: ModelSettings,
    /// Tokens per training sequence (the packed stream is cut into these). Default 64.
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Share of documents held out for eval loss and perplexity. Default 0.05.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_seq_len() -> usize {
    64
}
fn default_eval_fraction() -> f64 {
    0.05
}

impl StageKind for PretrainSettings {
    const KIND: &'static str = "pretrain";
    const RECIPE_VERSION: u32 = 5;
    const SUMMARY: &'static str = "train a new Llama on next-token prediction over a corpus";

    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::stage("tokenizer", &self.tokenizer),
            Input::data("corpus", &self.corpus),
        ]
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let cfg = self.model.config(512, self.seq_len);
        cfg.validate().map_err(|m| ("model".to_string(), m))?;
        if self.seq_len < 2 {
            return Err(("seq_len".into(), "must be at least 2".into()));
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            return Err((
                "eval_fraction".into(),
                format!("must be in [0, 1), got {}", self.eval_fraction),
            ));
        }
        self.train.validate()
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, &self.tokenizer, Some("posttrain"))?;
        let (df, path) = ctx.load(&self.corpus)?;
        let docs = formats::load_corpus(&df, &path)?;
        let held_out = prepare::test_mask(docs.len(), self.eval_fraction, ctx.seed);
        let (mut train_docs, mut eval_docs) = (Vec::new(), Vec::new());
        for (doc, test) in docs.into_iter().zip(held_out) {
            if test {
                eval_docs.push(doc)
            } else {
                train_docs.push(doc)
            }
        }
        ctx.progress.set_message("tokenizing");
        let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
        let train_data = pack_corpus(&tok, &train_docs, &mut cache, self.seq_len)?;
        let eval_data = pack_corpus(&tok, &eval_docs, &mut cache, self.seq_len)?;
        if train_data.is_empty() {
            return Err(StageError::Failed(format!(
                "the corpus gives no sequence of {} tokens: use a smaller `seq_len` or more text",
                self.seq_len
            )));
        }
        let unigram = unigram_entropy(&train_data);
        let vocab = tok.tokenizer.get_vocab_size(true);
        let config = self.model.config(vocab, self.seq_len);
        let eval = (!eval_data.is_empty()).then_some(&eval_data);
        let mut metrics = causal_lm::train(
            Init::Random {
                config: Box::new(config),
                seed: ctx.seed,
            },
            LmData {
                train: &train_data,
                eval,
                pad: pad_id(&tok),
            },
            &self.train,
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        metrics.insert("unigram_entropy".into(), unigram);
        metrics.insert("train_tokens".into(), train_data.trained_tokens() as f64);
        Ok(metrics)
    }
}

/// Entropy (nats) of the token frequencies: the loss of the best model
/// that ignores context, which a pre-trained model must beat.
fn unigram_entropy(data: &LmExamples) -> f64 {
    let mut counts = std::collections::HashMap::new();
    for t in data.tokens.iter().flatten() {
        *counts.entry(*t).or_insert(0usize) += 1;
    }
    let n: usize = counts.values().sum();
    counts
        .values()
        .map(|c| {
            let p = *c as f64 / n as f64;
            -p * p.ln()
        })
        .sum()
}
