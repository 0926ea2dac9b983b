//! `simpo`: simple preference optimisation (Meng et al. 2024): a margin
//! between the length-averaged log-probs of chosen and rejected answers,
//! no reference model. See `train/reference_free.rs` for the loss.
//!
//! ```toml
//! [stages.simpo]
//! kind = "simpo"
//! from = "sft"
//! data = { stage = "world", file = "comparisons.parquet" }
//! beta = 2.0
//! gamma = 0.5
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{model_outputs, validate_chat_template, validate_finetune};
use super::orpo::{default_max_len, inputs, run_reference_free};
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::train::optim::TrainSettings;
use crate::train::reference_free::RefFreeLoss;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpoSettings {
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
    /// Scale of the length-averaged log-prob margin. Default 2.0 (the
    /// paper's range 2.0-2.5; TRL's CPO trainer defaults to 0.1).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Target margin. Default 0.5 (TRL's `simpo_gamma`).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Weight of the chosen answers' NLL (TRL's `cpo_alpha`). Default 0,
    /// as the paper's SimPO.
    #[serde(default)]
    pub sft_weight: f64,
    /// Longest prompt + response in tokens. Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_beta() -> f64 {
    2.0
}
fn default_gamma() -> f64 {
    0.5
}

impl StageKind for SimpoSettings {
    const KIND: &'static str = "simpo";
    // 2: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "a length-averaged log-prob margin, no reference model";

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
        if !self.gamma.is_finite() || !self.sft_weight.is_finite() || self.sft_weight < 0.0 {
            return Err((
                "gamma".into(),
                "`gamma` must be finite and `sft_weight` at least 0".into(),
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
            RefFreeLoss::Simpo {
                beta: self.beta,
                gamma: self.gamma,
                sft_weight: self.sft_weight,
            },
        )
    }
}
