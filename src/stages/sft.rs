//! `sft`: supervised finetuning of an upstream model on demonstrations
//! (prompt + response, prompt + completion, or conversational `messages`),
//! rendered with the chat template; loss on response tokens only. Held-out
//! loss and perplexity are logged every `train.eval_every` steps.
//!
//! ```toml
//! [stages.sft]
//! kind = "sft"
//! from = "base"                                                   # a model stage
//! data = { stage = "world", file = "demonstrations.parquet" }
//! eval_data = { stage = "world", file = "demonstrations_test.parquet" }
//! train = { steps = 200, lr = 1e-3 }
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, finetune_inputs, model_outputs, pad_id,
    upstream_tokenizer, validate_chat_template, validate_finetune,
};
use super::token_data::load_demonstrations;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::train::causal_lm::{self, Init, LmData};
use crate::train::optim::TrainSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// The model to finetune (a pretrain, load or sft stage). Required.
    pub from: StageRef,
    /// Demonstrations. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub data: DataSource,
    /// Held-out demonstrations for eval loss and perplexity. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_data: Option<DataSource>,
    /// Longest prompt + response in tokens; longer ones are cut. Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub train: TrainSettings,
    /// LoRA adapters (PEFT's) trained instead of the whole model:
    /// `lora = { r = 16, alpha = 32, target = ["q_proj", ...] }`. The
    /// output is the merged model, with the adapter in `adapter/`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraSettings>,
}

fn default_max_len() -> usize {
    128
}

impl StageKind for SftSettings {
    const KIND: &'static str = "sft";
    // 6: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 6;
    const SUMMARY: &'static str = "finetune a model on demonstrations, loss on responses only";

    fn inputs(&self) -> Vec<Input> {
        let mut all = { finetune_inputs(&self.from, &self.data, self.eval_data.as_ref()) };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
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
        let train_data = load_demonstrations(ctx, &self.data, &tok, &mut cache, self.max_len)?;
        let eval_data = match &self.eval_data {
            Some(e) => Some(load_demonstrations(ctx, e, &tok, &mut cache, self.max_len)?),
            None => None,
        };
        let mut metrics = causal_lm::train(
            Init::Load(ctx.stage_dir(&self.from)?),
            LmData {
                train: &train_data,
                eval: eval_data.as_ref(),
                pad: pad_id(&tok),
            },
            &self.train.with_lora(self.lora.as_ref(), ctx.seed),
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        super::model_files::record_context(ctx.out_dir, self.max_len)?;
        metrics.insert("train_examples".into(), train_data.len() as f64);
        Ok(metrics)
    }
}
