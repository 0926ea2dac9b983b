//! `grpo`: online RL with group-relative advantages (DeepSeekMath's GRPO,
//! as TRL's `GRPOTrainer` runs it): `num_generations` answers per prompt,
//! rewarded by a reward model and/or rule-based verifiers (the world's gold
//! labeler as a verifiable reward, an exact-answer check, a format rule),
//! no value model. See `train/group.rs` for the loss; the shared rollout
//! helper `run_group` also serves `rloo`.
//!
//! ```toml
//! [stages.grpo]
//! kind = "grpo"
//! from = "sft"
//! prompts = { stage = "world", file = "prompts_train.parquet" }
//! gold = "world"                 # verifiable reward: the gold labeler
//! rewards = { gold = 1.0 }       # weights; reward_model = w adds a reward stage's score
//! num_generations = 8
//! train = { steps = 60, batch_size = 4, lr = 2e-5 }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, decode, load_reward_model, load_world, model_outputs,
    pad_id, stop_ids, upstream_tokenizer, validate_chat_template,
};
use super::token_data::load_prompts;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::verifiers::{self, Verifiers};
use crate::model::generate::SampleSettings;
use crate::train::group::{self, Estimator, GroupConfig, GroupModels, LossType, ScaleRewards};
use crate::train::optim::TrainSettings;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewardsSetting {
    Group,
    Batch,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossTypeSetting {
    Grpo,
    Bnpo,
    DrGrpo,
    Dapo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoSettings {
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
    /// The frozen reference of the KL term (used when `beta` > 0). Default: `from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// A reward stage whose score is a reward (weight `rewards.reward_model`, default 1). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<StageRef>,
    /// A synth stage whose gold labeler the `gold` and `correct` checks use. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<StageRef>,
    /// Weights of the reward sources: `reward_model`, `gold`, `correct`,
    /// `format`. Default: 1.0 for the reward model and for `gold` when
    /// those stages are given.
    #[serde(default)]
    pub rewards: BTreeMap<String, f64>,
    /// Prompts to sample from. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// Answers per prompt (G). Default 8 (TRL).
    #[serde(default = "default_generations")]
    pub num_generations: usize,
    /// Coefficient of the k3 KL to the reference in the loss. Default 0
    /// (TRL's default: no reference model is loaded).
    #[serde(default)]
    pub beta: f64,
    /// Clip range below 1. Default 0.2.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Clip range above 1 (DAPO's clip-higher). Default: `epsilon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_high: Option<f64>,
    /// "group" (default), "batch" or "none" (Dr. GRPO).
    #[serde(default = "default_scale")]
    pub scale_rewards: ScaleRewardsSetting,
    /// "dapo" (default, TRL's), "grpo", "bnpo" or "dr_grpo".
    #[serde(default = "default_loss_type")]
    pub loss_type: LossTypeSetting,
    /// Updates per batch of rollouts. Default 1.
    #[serde(default = "default_one")]
    pub num_iterations: usize,
    /// Minibatches per update pass. Default 1.
    #[serde(default = "default_one")]
    pub minibatches: usize,
    /// How the policy samples. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
    /// `steps` = iterations, `batch_size` = prompts per iteration (each
    /// sampled `num_generations` times). Default steps 60, batch 4, lr 2e-5,
    /// warm-up 5; fields not given keep these.
    #[serde(default = "default_train", deserialize_with = "train_over_default")]
    pub train: TrainSettings,
}

fn default_generations() -> usize {
    8
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_one() -> usize {
    1
}
fn default_scale() -> ScaleRewardsSetting {
    ScaleRewardsSetting::Group
}
fn default_loss_type() -> LossTypeSetting {
    LossTypeSetting::Dapo
}
fn train_over_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TrainSettings, D::Error> {
    super::defaults::merged_over(default_train(), d)
}
pub(super) fn default_train() -> TrainSettings {
    TrainSettings {
        steps: 60,
        batch_size: 4,
        lr: 2e-5,
        warmup_steps: 5,
        ..TrainSettings::default()
    }
}

/// What `grpo` and `rloo` share: models, rewards, prompts, sampling.
pub(super) struct GroupRun<'a> {
    pub chat_template: Option<&'a str>,
    pub from: &'a StageRef,
    pub reference: Option<&'a StageRef>,
    pub reward_model: Option<&'a StageRef>,
    pub gold: Option<&'a StageRef>,
    pub rewards: &'a BTreeMap<String, f64>,
    pub prompts: &'a DataSource,
    pub group_size: usize,
    pub sampling: &'a SampleSettings,
    pub train: &'a TrainSettings,
}

impl GroupRun<'_> {
    pub fn inputs(&self) -> Vec<Input> {
        let mut inputs = vec![Input::stage("from", self.from)];
        inputs.extend(self.reference.map(|r| Input::stage("reference", r)));
        inputs.extend(self.reward_model.map(|r| Input::stage("reward_model", r)));
        inputs.extend(self.gold.map(|g| Input::stage("gold", g)));
        inputs.push(Input::data("prompts", self.prompts));
        inputs.extend(chat_template_input(self.chat_template));
        inputs
    }

    /// The weights with their defaults: 1.0 for each source given.
    fn weights(&self) -> BTreeMap<String, f64> {
        let mut w = self.rewards.clone();
        if self.reward_model.is_some() {
            w.entry("reward_model".into()).or_insert(1.0);
        }
        if self.gold.is_some() {
            w.entry("gold".into()).or_insert(1.0);
        }
        w
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template)?;
        let w = self.weights();
        verifiers::validate(&w, self.gold.is_some())?;
        if w.contains_key("reward_model") && self.reward_model.is_none() {
            return Err((
                "rewards.reward_model".into(),
                "weights a reward model but `reward_model` names none".into(),
            ));
        }
        if w.values().all(|x| *x == 0.0) {
            return Err((
                "rewards".into(),
                "no reward: give `reward_model`, `gold`, or a check in `rewards` (gold, correct, format)".into(),
            ));
        }
        if self.group_size < 2 {
            return Err((
                "num_generations".into(),
                "a group needs at least 2 answers per prompt".into(),
            ));
        }
        if self.sampling.max_new_tokens == 0 {
            return Err((
                "sampling.max_new_tokens".into(),
                "must be at least 1".into(),
            ));
        }
        if self.train.grad_accum != 1 {
            return Err((
                "train.grad_accum".into(),
                "group methods take one step per minibatch: use `minibatches` instead".into(),
            ));
        }
        self.train.validate()
    }

    /// Sample, reward and train with `estimator`.
    pub fn run(
        &self,
        ctx: &StageContext,
        estimator: Estimator,
        beta: f64,
        epsilon: (f64, f64),
        num_iterations: usize,
        minibatches: usize,
    ) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, self.from, self.chat_template)?;
        let prompts = load_prompts(ctx, self.prompts, &tok)?;
        let weights = self.weights();
        let world = match self.gold {
            Some(g) => Some(load_world(ctx, "gold", g)?),
            None => None,
        };
        let checks = Verifiers::new(
            &weights
                .iter()
                .filter(|(k, _)| *k != "reward_model")
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            world.as_ref(),
        );
        if let Some(r) = self.reward_model {
            load_reward_model(ctx, "reward_model", r)?;
        }
        let stops = stop_ids(&tok);
        let verifier = |owners: &[usize], responses: &[Vec<usize>]| -> Vec<f64> {
            if checks.is_empty() {
                return vec![0.0; responses.len()];
            }
            owners
                .iter()
                .zip(responses)
                .map(|(o, r)| {
                    let finished = r.last().is_some_and(|t| stops.contains(t));
                    let body = if finished { &r[..r.len() - 1] } else { &r[..] };
                    let text = decode(&tok, body).unwrap_or_default();
                    checks.score(&prompts.questions[*o], &text, finished)
                })
                .collect()
        };
        let cfg = GroupConfig {
            estimator,
            group_size: self.group_size,
            beta,
            epsilon: epsilon.0,
            epsilon_high: epsilon.1,
            num_iterations,
            minibatches,
            reward_model_weight: weights.get("reward_model").copied().unwrap_or(0.0),
            sampling: self.sampling.clone(),
            pad: pad_id(&tok),
            stops: stops.clone(),
        };
        let reward_dir = match self.reward_model {
            Some(r) => Some(ctx.stage_dir(r)?),
            None => None,
        };
        let models = GroupModels {
            policy: ctx.stage_dir(self.from)?,
            reference: Some(ctx.stage_dir(self.reference.unwrap_or(self.from))?),
            reward: reward_dir,
        };
        let mut metrics = group::train(
            &models,
            &prompts.ids,
            &verifier,
            &cfg,
            self.train,
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        metrics.insert("prompts".into(), prompts.len() as f64);
        Ok(metrics)
    }
}

impl GrpoSettings {
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

impl StageKind for GrpoSettings {
    const KIND: &'static str = "grpo";
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "online RL with group-relative advantages (GRPO), reward model and/or verifiers";

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
        if let Some(h) = self.epsilon_high {
            if !h.is_finite() || h < 0.0 {
                return Err((
                    "epsilon_high".into(),
                    format!("must be at least 0, got {h}"),
                ));
            }
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
        let estimator = Estimator::Grpo {
            scale_rewards: match self.scale_rewards {
                ScaleRewardsSetting::Group => ScaleRewards::Group,
                ScaleRewardsSetting::Batch => ScaleRewards::Batch,
                ScaleRewardsSetting::None => ScaleRewards::None,
            },
            loss_type: match self.loss_type {
                LossTypeSetting::Grpo => LossType::Grpo,
                LossTypeSetting::Bnpo => LossType::Bnpo,
                LossTypeSetting::DrGrpo => LossType::DrGrpo,
                LossTypeSetting::Dapo => LossType::Dapo,
            },
        };
        self.group().run(
            ctx,
            estimator,
            self.beta,
            (self.epsilon, self.epsilon_high.unwrap_or(self.epsilon)),
            self.num_iterations,
            self.minibatches,
        )
    }
}
