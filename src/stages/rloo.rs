//! `rloo`: REINFORCE leave-one-out (Ahmadian et al. 2024, TRL's
//! `RLOOTrainer`): `num_generations` answers per prompt, the KL to the
//! reference (k1, per sequence) subtracted from each reward, each answer's
//! baseline the mean reward of the others, a sequence-level clipped ratio.
//! Rewards and rollouts as in `grpo` (see there).
//!
//! ```toml
//! [stages.rloo]
//! kind = "rloo"
//! from = "sft"
//! reward_model = "rm"
//! prompts = { stage = "world", file = "prompts_train.parquet" }
//! num_generations = 4
//! beta = 0.05
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::grpo::GroupRun;
use super::model_files::model_outputs;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::model::generate::SampleSettings;
use crate::train::group::Estimator;
use crate::train::optim::TrainSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlooSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// The policy's starting model. Required.
    pub from: StageRef,
    /// The frozen reference of the KL term. Default: `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// A reward stage whose score is a reward (weight `rewards.reward_model`, default 1). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<StageRef>,
    /// A synth stage whose gold labeler the `gold` and `correct` checks use. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<StageRef>,
    /// Weights of the reward sources, as for `grpo`.
    #[serde(default)]
    pub rewards: BTreeMap<String, f64>,
    /// Prompts to sample from. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// Answers per prompt (k). Default 2 (TRL).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Coefficient of the per-sequence k1 KL subtracted from the reward. Default 0.05 (TRL).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Clip range of the sequence ratio. Default 0.2.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Updates per batch of rollouts. Default 1.
    #[serde(default = "default_one")]
    pub num_iterations: usize,
    /// Minibatches per update pass. Default 1.
    #[serde(default = "default_one")]
    pub minibatches: usize,
    /// How the policy samples. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
    /// As for `grpo`: `batch_size` prompts per iteration. Default steps 60,
    /// batch 4, lr 2e-5, warm-up 5.
    #[serde(
        default = "super::grpo::default_train",
        deserialize_with = "train_over_default"
    )]
    pub train: TrainSettings,
}

fn default_generations() -> usize {
    2
}
fn default_beta() -> f64 {
    0.05
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_one() -> usize {
    1
}
fn train_over_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TrainSettings, D::Error> {
    super::defaults::merged_over(super::grpo::default_train(), d)
}

impl RlooSettings {
    fn group(&self) -> GroupRun<'_> {
        GroupRun {
            chat_template: self.chat_template.as_deref(),
            from: &self.from,
            reference: self.reference.as_ref(),
            reward_model: self.reward_model.as_ref(),
            gold: self.gold.as_ref(),
            rewards: &self.rewards,
            prompts: &self.prompts,
            group_size: self.num_generations,
            sampling: &self.sampling,
            train: &self.train,
        }
    }
}

impl StageKind for RlooSettings {
    const KIND: &'static str = "rloo";
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "online RL with leave-one-out baselines (RLOO), KL in the reward";

    fn inputs(&self) -> Vec<Input> {
        self.group().inputs()
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..1.0).contains(&self.epsilon) {
            return Err((
                "epsilon".into(),
                format!("must be in [0, 1), got {}", self.epsilon),
            ));
        }
        if !self.beta.is_finite() || self.beta < 0.0 {
            return Err((
                "beta".into(),
                format!("must be at least 0, got {}", self.beta),
            ));
        }
        if self.num_iterations == 0 || self.minibatches == 0 {
            return Err((
                "num_iterations".into(),
                "`num_iterations` and `minibatches` must be at least 1".into(),
            ));
        }
        self.group().validate()
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        self.group().run(
            ctx,
            Estimator::Rloo,
            self.beta,
            (self.epsilon, self.epsilon),
            self.num_iterations,
            self.minibatches,
        )
    }
}
