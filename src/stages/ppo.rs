//! `ppo`: RLHF. The policy starts from `from`, the frozen reference is
//! `reference` (default: the same stage), the reward model is
//! `reward_model`, and the value model starts as a copy of the reward
//! model (see `train/ppo.rs` for the loop and why). The output folder is
//! the policy's model folder; the value model is kept in `value/`.
//!
//! ```toml
//! [stages.ppo]
//! kind = "ppo"
//! from = "sft"
//! reward_model = "rm"
//! prompts = { stage = "world", file = "prompts_train.parquet" }
//! kl_coef = 0.05
//! train = { steps = 60, batch_size = 16, lr = 2e-5 }
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, load_reward_model, model_outputs, pad_id, stop_ids,
    upstream_tokenizer, validate_chat_template,
};
use super::token_data::{load_prompts, pack_corpus};
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::formats;
use crate::data::tokenize::TokenCache;
use crate::model::generate::SampleSettings;
use crate::train::optim::TrainSettings;
use crate::train::ppo::{self, PpoConfig, PpoModels};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PpoSettings {
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
    /// The frozen reference of the KL penalty. Default: the `from` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// The reward stage that scores responses (and starts the value model). Required.
    pub reward_model: StageRef,
    /// Prompts to sample from. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// Initial coefficient of the per-token KL penalty. Default 0.05 (TRL).
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// Adaptive KL controller: the per-sequence KL to aim for. Default: none (fixed `kl_coef`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive controller, in samples. Default 10000.
    #[serde(default = "default_horizon")]
    pub horizon: f64,
    /// Clip range of the policy ratio. Default 0.2.
    #[serde(default = "default_clip")]
    pub clip_range: f64,
    /// Clip range of the value update. Default 0.2.
    #[serde(default = "default_clip")]
    pub clip_range_value: f64,
    /// Discount. Default 1.0.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// GAE lambda. Default 0.95.
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// Passes over each iteration's rollouts. Default 4.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Minibatches per pass. Default 4.
    #[serde(default = "default_minibatches")]
    pub minibatches: usize,
    /// Clip the reward model's score to [-c, c]. Default: no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_clip: Option<f64>,
    /// Whiten the per-token rewards over each batch. Default false.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// PPO-ptx: a corpus whose language-model loss is mixed in. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub ptx_data: Option<DataSource>,
    /// Weight of the PPO-ptx loss. Default 0 (no mixing).
    #[serde(default)]
    pub ptx_coef: f64,
    /// Sequence length of the PPO-ptx corpus chunks. Default 64.
    #[serde(default = "default_ptx_seq_len")]
    pub ptx_seq_len: usize,
    /// How the policy samples during training. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
    /// `steps` = PPO iterations, `batch_size` = rollouts per iteration,
    /// `checkpoint_every` in iterations (`eval_every` is unused: PPO logs
    /// its rollouts' statistics every iteration). Default steps 60, lr
    /// 2e-5, warm-up 5; fields not given keep these.
    #[serde(default = "default_train", deserialize_with = "train_over_default")]
    pub train: TrainSettings,
    /// LoRA adapters (PEFT's) trained instead of the whole model:
    /// `lora = { r = 16, alpha = 32, target = ["q_proj", ...] }`. The
    /// output is the merged model, with the adapter in `adapter/`. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::model::lora::LoraSettings>,
}

fn default_kl_coef() -> f64 {
    0.05
}
fn default_horizon() -> f64 {
    10000.0
}
fn default_clip() -> f64 {
    0.2
}
fn default_gamma() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_epochs() -> usize {
    4
}
fn default_minibatches() -> usize {
    4
}
fn default_ptx_seq_len() -> usize {
    64
}
fn train_over_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TrainSettings, D::Error> {
    super::defaults::merged_over(default_train(), d)
}
fn default_train() -> TrainSettings {
    TrainSettings {
        steps: 60,
        lr: 2e-5,
        warmup_steps: 5,
        ..TrainSettings::default()
    }
}

impl StageKind for PpoSettings {
    const KIND: &'static str = "ppo";
    const RECIPE_VERSION: u32 = 5;
    const SUMMARY: &'static str =
        "RLHF: PPO against a reward model with a KL penalty to a reference";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            let mut inputs = vec![
                Input::stage("from", &self.from),
                Input::stage("reward_model", &self.reward_model),
                Input::data("prompts", &self.prompts),
            ];
            inputs.extend(
                self.reference
                    .as_ref()
                    .map(|r| Input::stage("reference", r)),
            );
            inputs.extend(self.ptx_data.as_ref().map(|d| Input::data("ptx_data", d)));
            inputs
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if let Some(lora) = &self.lora {
            lora.validate_without_dropout("ppo")?;
        }
        let positive = [
            ("kl_coef", self.kl_coef, true),
            ("horizon", self.horizon, false),
            ("clip_range", self.clip_range, false),
            ("clip_range_value", self.clip_range_value, false),
        ];
        for (field, v, zero_ok) in positive {
            if !(v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0))) {
                return Err((field.into(), format!("must be positive, got {v}")));
            }
        }
        if let Some(t) = self.target_kl {
            if !(t > 0.0 && t.is_finite()) {
                return Err(("target_kl".into(), format!("must be positive, got {t}")));
            }
        }
        for (field, v) in [("gamma", self.gamma), ("lam", self.lam)] {
            if !(0.0..=1.0).contains(&v) {
                return Err((field.into(), format!("must be in [0, 1], got {v}")));
            }
        }
        if self.epochs == 0 || self.minibatches == 0 {
            return Err((
                "epochs".into(),
                "`epochs` and `minibatches` must be at least 1".into(),
            ));
        }
        if !self.train.batch_size.is_multiple_of(self.minibatches) {
            return Err((
                "minibatches".into(),
                format!(
                    "{} minibatches do not split `train.batch_size` = {} rollouts evenly",
                    self.minibatches, self.train.batch_size
                ),
            ));
        }
        if self.train.grad_accum != 1 {
            return Err((
                "train.grad_accum".into(),
                "PPO takes one step per minibatch: use `minibatches` instead".into(),
            ));
        }
        if self.ptx_coef < 0.0 || (self.ptx_coef > 0.0) != self.ptx_data.is_some() {
            return Err((
                "ptx_coef".into(),
                "PPO-ptx needs both `ptx_data` and a positive `ptx_coef`".into(),
            ));
        }
        if self.sampling.max_new_tokens == 0 {
            return Err((
                "sampling.max_new_tokens".into(),
                "must be at least 1".into(),
            ));
        }
        self.train.validate()
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(model_outputs())
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, &self.from, self.chat_template.as_deref())?;
        let pad = pad_id(&tok);
        let stops = stop_ids(&tok);
        let prompts = load_prompts(ctx, &self.prompts, &tok)?;
        let ptx = match &self.ptx_data {
            Some(source) => {
                let (df, path) = ctx.load(source)?;
                let docs = formats::load_corpus(&df, &path)?;
                let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
                let data = pack_corpus(&tok, &docs, &mut cache, self.ptx_seq_len)?;
                if data.is_empty() {
                    return Err(StageError::Failed(format!(
                        "{}: no sequence of `ptx_seq_len` = {} tokens",
                        path.display(),
                        self.ptx_seq_len
                    )));
                }
                Some(data)
            }
            None => None,
        };
        // Checked here so a wrong stage is refused by name before training.
        load_reward_model(ctx, "reward_model", &self.reward_model)?;
        let reward_dir = ctx.stage_dir(&self.reward_model)?;
        let cfg = PpoConfig {
            kl_coef: self.kl_coef,
            target_kl: self.target_kl,
            horizon: self.horizon,
            clip_range: self.clip_range,
            clip_range_value: self.clip_range_value,
            gamma: self.gamma,
            lam: self.lam,
            epochs: self.epochs,
            minibatches: self.minibatches,
            score_clip: self.score_clip,
            whiten_rewards: self.whiten_rewards,
            ptx_coef: self.ptx_coef,
            sampling: self.sampling.clone(),
            pad,
            stops,
        };
        let models = PpoModels {
            policy: ctx.stage_dir(&self.from)?,
            reference: ctx.stage_dir(self.reference.as_ref().unwrap_or(&self.from))?,
            reward: reward_dir,
        };
        let mut metrics = ppo::train(
            &models,
            &prompts.ids,
            ptx.as_ref(),
            &cfg,
            &self.train.with_lora(self.lora.as_ref(), ctx.seed),
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
