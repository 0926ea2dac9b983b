//! `reward`: a reward model: the backbone of `from` plus a scalar head read
//! at the last token of prompt + response, trained on comparisons with
//! `-log sigmoid(r(x, y_w) - r(x, y_l) - margin)` (the margin column when
//! the data has one). Rankings train on all their pairs, batched together.
//! Held-out accuracy (ties count half) is logged every `train.eval_every`.
//!
//! ```toml
//! [stages.rm]
//! kind = "reward"
//! from = "sft"
//! data = { stage = "world", file = "rankings.parquet" }
//! eval_data = { stage = "world", file = "comparisons_test.parquet" }
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{
    copy_tokenizer, finetune_inputs, model_outputs, pad_id, upstream_tokenizer, validate_finetune,
};
use super::token_data::load_pairs;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::train::optim::TrainSettings;
use crate::train::reward;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSettings {
    /// The model whose backbone starts the reward model. Required.
    pub from: StageRef,
    /// Comparisons or rankings. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub data: DataSource,
    /// Held-out comparisons for accuracy. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_data: Option<DataSource>,
    /// Longest prompt + response in tokens. Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_max_len() -> usize {
    128
}

impl StageKind for RewardSettings {
    const KIND: &'static str = "reward";
    const RECIPE_VERSION: u32 = 1;
    const SUMMARY: &'static str = "train a reward model on comparisons or rankings";

    fn inputs(&self) -> Vec<Input> {
        finetune_inputs(&self.from, &self.data, self.eval_data.as_ref())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_finetune(self.max_len, &self.train)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, &self.from)?;
        let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
        ctx.progress.set_message("tokenizing");
        let data = load_pairs(ctx, &self.data, &tok, &mut cache, self.max_len)?;
        let eval = match &self.eval_data {
            Some(e) => Some(load_pairs(ctx, e, &tok, &mut cache, self.max_len)?),
            None => None,
        };
        let mut metrics = reward::train(
            ctx.stage_dir(&self.from)?,
            &data,
            eval.as_ref(),
            pad_id(&tok),
            &self.train,
            ctx.seed,
            ctx.out_dir,
            ctx.progress,
        )?;
        copy_tokenizer(&tok_path, ctx.out_dir)?;
        metrics.insert("pairs".into(), data.pairs.len() as f64);
        Ok(metrics)
    }
}
