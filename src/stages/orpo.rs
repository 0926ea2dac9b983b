//! `orpo`: odds-ratio preference optimisation (Hong et al. 2024): SFT on
//! the chosen answers plus a log-odds-ratio penalty on the rejected ones,
//! in one stage and without a reference model. See
//! `train/reference_free.rs` for the loss; `simpo` shares this stage's
//! data path (`run_reference_free`).
//!
//! ```toml
//! [stages.orpo]
//! kind = "orpo"
//! from = "sft"
//! data = { stage = "world", file = "comparisons.parquet" }
//! beta = 0.1
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, finetune_inputs, model_outputs, pad_id,
    upstream_tokenizer, validate_chat_template, validate_finetune,
};
use super::token_data::load_pairs;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::train::optim::TrainSettings;
use crate::train::reference_free::{self, RefFreeLoss};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrpoSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// The model to train (no reference is needed). Required.
    pub from: StageRef,
    /// Comparisons (TRL columns, HH-RLHF transcripts or rankings). Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub data: DataSource,
    /// Held-out comparisons for eval loss and implicit-reward accuracy. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_data: Option<DataSource>,
    /// Weight of the odds-ratio term (the paper's lambda). Default 0.1 (TRL).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Longest prompt + response in tokens. Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_beta() -> f64 {
    0.1
}
pub(super) fn default_max_len() -> usize {
    128
}

/// Load the pairs, train with `kind`, write the model folder.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_reference_free(
    ctx: &StageContext,
    chat_template: Option<&str>,
    from: &StageRef,
    data: &DataSource,
    eval_data: Option<&DataSource>,
    max_len: usize,
    train: &TrainSettings,
    kind: RefFreeLoss,
) -> Result<Metrics, StageError> {
    let (tok, tok_path) = upstream_tokenizer(ctx, from, chat_template)?;
    let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
    ctx.progress.set_message("tokenizing");
    let pairs = load_pairs(ctx, data, &tok, &mut cache, max_len)?.pairs;
    let eval = match eval_data {
        Some(e) => Some(load_pairs(ctx, e, &tok, &mut cache, max_len)?.pairs),
        None => None,
    };
    let mut metrics = reference_free::train(
        ctx.stage_dir(from)?,
        &pairs,
        eval.as_ref(),
        kind,
        pad_id(&tok),
        train,
        ctx.seed,
        ctx.out_dir,
        &ctx.checkpoints(),
        ctx.progress,
    )?;
    copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
    super::model_files::record_context(ctx.out_dir, max_len)?;
    metrics.insert("pairs".into(), pairs.len() as f64);
    Ok(metrics)
}

pub(super) fn inputs(
    from: &StageRef,
    data: &DataSource,
    eval_data: Option<&DataSource>,
    chat_template: Option<&str>,
) -> Vec<Input> {
    let mut all = finetune_inputs(from, data, eval_data);
    all.extend(chat_template_input(chat_template));
    all
}

impl StageKind for OrpoSettings {
    const KIND: &'static str = "orpo";
    // 2: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "SFT plus an odds-ratio preference penalty, no reference model";

    fn inputs(&self) -> Vec<Input> {
        inputs(
            &self.from,
            &self.data,
            self.eval_data.as_ref(),
            self.chat_template.as_deref(),
        )
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err((
                "beta".into(),
                format!("must be positive, got {}", self.beta),
            ));
        }
        validate_finetune(self.max_len, &self.train)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        run_reference_free(
            ctx,
            self.chat_template.as_deref(),
            &self.from,
            &self.data,
            self.eval_data.as_ref(),
            self.max_len,
            &self.train,
            RefFreeLoss::Orpo { beta: self.beta },
        )
    }
}
