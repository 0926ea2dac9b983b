//! `reward`: a reward model: the backbone of `from` plus a scalar head read
//! at the last token of prompt + response, trained on comparisons with
//! `-log sigmoid(r(x, y_w) - r(x, y_l) - margin)` (the margin column when
//! the data has one). Rankings train on all their pairs, batched together.
//! Held-out accuracy (ties count half) is logged every `train.eval_every`.
//!
//! With `normalize`, the finished model scores a policy's answers to a set
//! of prompts and stores minus their mean as `reward_offset` in its
//! config.json, so that policy's answers score 0 on average wherever the
//! model is used (best_of_n, ppo, eval).
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
    chat_template_input, copy_tokenizer, finetune_inputs, model_outputs, pad_id, stop_ids,
    upstream_tokenizer, validate_chat_template, validate_finetune,
};
use super::token_data::{load_pairs, load_prompts};
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::model::frozen::FrozenModel;
use crate::model::generate::SampleSettings;
use crate::train::optim::TrainSettings;
use crate::train::reward;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
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
    /// LoRA adapters (PEFT's) trained instead of the whole model:
    /// `lora = { r = 16, alpha = 32, target = ["q_proj", ...] }`. The
    /// output is the merged model, with the adapter in `adapter/`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraSettings>,
    /// Shift scores so that a policy's answers average 0. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalization>,
}

/// `normalize = { policy = "sft", prompts = ... }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    /// The model whose answers should score 0 on average. Required.
    pub policy: StageRef,
    /// The prompts it answers. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// How it answers. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
}

fn default_max_len() -> usize {
    128
}

impl StageKind for RewardSettings {
    const KIND: &'static str = "reward";
    // 6: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 6;
    const SUMMARY: &'static str = "train a reward model on comparisons or rankings";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            let mut inputs = finetune_inputs(&self.from, &self.data, self.eval_data.as_ref());
            if let Some(n) = &self.normalize {
                inputs.push(Input::stage("normalize.policy", &n.policy));
                inputs.push(Input::data("normalize.prompts", &n.prompts));
            }
            inputs
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if let Some(lora) = &self.lora {
            lora.validate_without_dropout("reward")?;
        }
        if let Some(n) = &self.normalize {
            if n.sampling.max_new_tokens == 0 {
                return Err((
                    "normalize.sampling.max_new_tokens".into(),
                    "must be at least 1".into(),
                ));
            }
        }
        validate_finetune(self.max_len, &self.train)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, &self.from, self.chat_template.as_deref())?;
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
            &self.train.with_lora(self.lora.as_ref(), ctx.seed),
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        super::model_files::record_context(ctx.out_dir, self.max_len)?;
        metrics.insert("pairs".into(), data.pairs.len() as f64);
        if let Some(n) = &self.normalize {
            ctx.progress.set_message("normalizing");
            let (mean, std) = normalize(ctx, n, &tok)?;
            metrics.insert("normalization_mean".into(), mean);
            metrics.insert("normalization_std".into(), std);
        }
        Ok(metrics)
    }
}

/// Score the policy's answers with the finished model and store minus
/// their mean in its config.json; returns the mean and standard deviation
/// before the shift.
fn normalize(
    ctx: &StageContext,
    n: &Normalization,
    tok: &crate::data::tokenize::LoadedTokenizer,
) -> Result<(f64, f64), StageError> {
    let pad = pad_id(tok);
    let stops = stop_ids(tok);
    let prompts = load_prompts(ctx, &n.prompts, tok)?;
    let policy = FrozenModel::load(ctx.stage_dir(&n.policy)?)?;
    let answers = policy.sample(&prompts.ids, 1, &stops, pad, &n.sampling, ctx.seed, BATCH);
    let sequences: Vec<Vec<usize>> = prompts
        .ids
        .iter()
        .zip(&answers)
        .map(|(p, a)| a.sequence(p))
        .collect();
    let scores: Vec<f64> = FrozenModel::load(ctx.out_dir)?
        .scores(&sequences, pad, BATCH)
        .into_iter()
        .map(f64::from)
        .collect();
    let mean = crate::results::stats::mean(&scores);
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / scores.len() as f64;
    crate::model::checkpoint::set_reward_offset(ctx.out_dir, -mean)?;
    Ok((mean, var.sqrt()))
}

/// Sequences per forward pass when normalizing (the same as best_of_n's
/// and eval's default, so their samples of the same prompts coincide).
const BATCH: usize = 32;
