//! `dpo`: direct preference optimisation. The policy starts from `from`;
//! the frozen reference is `reference` (default: the same stage). The
//! reference's log-probs of every pair are computed once, written to
//! `reference_logprobs.parquet`, and cached by content (reference model key
//! + token ids) so a rerun with other DPO settings reuses them.
//!
//! ```toml
//! [stages.dpo]
//! kind = "dpo"
//! from = "sft"
//! data = { stage = "world", file = "comparisons.parquet" }
//! eval_data = { stage = "world", file = "comparisons_test.parquet" }
//! beta = 0.1
//! ```

use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, finetune_inputs, model_outputs, pad_id,
    upstream_tokenizer, validate_chat_template, validate_finetune,
};
use super::token_data::load_pairs;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::tokenize::TokenCache;
use crate::train::dpo::{self, DpoConfig, PairExamples};
use crate::train::optim::TrainSettings;
use crate::train::preference::DpoLoss;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSettings {
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
    /// The frozen reference model. Default: the `from` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// Comparisons (TRL columns, HH-RLHF transcripts or rankings). Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub data: DataSource,
    /// Held-out comparisons for eval loss and reward accuracy. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_data: Option<DataSource>,
    /// Strength of the KL anchor to the reference. Default 0.1.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// "sigmoid" (DPO), "ipo" or "hinge". Default "sigmoid".
    #[serde(default = "default_loss")]
    pub loss: DpoLoss,
    /// cDPO: the assumed share of flipped labels (sigmoid loss only). Default 0.
    #[serde(default)]
    pub label_smoothing: f64,
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
}

fn default_beta() -> f64 {
    0.1
}
fn default_loss() -> DpoLoss {
    DpoLoss::Sigmoid
}
fn default_max_len() -> usize {
    128
}

impl StageKind for DpoSettings {
    const KIND: &'static str = "dpo";
    // 6: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 6;
    const SUMMARY: &'static str = "direct preference optimisation against a frozen reference";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            let mut inputs = finetune_inputs(&self.from, &self.data, self.eval_data.as_ref());
            inputs.extend(
                self.reference
                    .as_ref()
                    .map(|r| Input::stage("reference", r)),
            );
            inputs
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if let Some(lora) = &self.lora {
            lora.validate_without_dropout("dpo")?;
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err((
                "beta".into(),
                format!("must be positive, got {}", self.beta),
            ));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err((
                "label_smoothing".into(),
                format!("must be in [0, 0.5), got {}", self.label_smoothing),
            ));
        }
        if self.label_smoothing > 0.0 && self.loss != DpoLoss::Sigmoid {
            return Err((
                "label_smoothing".into(),
                "applies to the sigmoid loss only".into(),
            ));
        }
        validate_finetune(self.max_len, &self.train)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        let mut out = model_outputs();
        out.push("reference_logprobs.parquet".into());
        Some(out)
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, tok_path) = upstream_tokenizer(ctx, &self.from, self.chat_template.as_deref())?;
        let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
        ctx.progress.set_message("tokenizing");
        let pairs = load_pairs(ctx, &self.data, &tok, &mut cache, self.max_len)?.pairs;
        let eval = match &self.eval_data {
            Some(e) => Some(load_pairs(ctx, e, &tok, &mut cache, self.max_len)?.pairs),
            None => None,
        };
        let reference = ctx
            .stage_dir(self.reference.as_ref().unwrap_or(&self.from))?
            .to_path_buf();
        let pad = pad_id(&tok);
        ctx.progress.set_message("reference log-probs");
        let (refs, hit) = cached_reference(ctx, &reference, &pairs, pad, self.train.batch_size)?;
        let eval_refs = match &eval {
            Some(e) => Some(cached_reference(ctx, &reference, e, pad, self.train.batch_size)?.0),
            None => None,
        };
        let mut df = df!("chosen" => refs.0.clone(), "rejected" => refs.1.clone())
            .map_err(crate::data::DataError::from)?;
        crate::data::write_parquet(&mut df, &ctx.out("reference_logprobs.parquet"))?;

        let cfg = DpoConfig {
            beta: self.beta,
            loss: self.loss,
            label_smoothing: self.label_smoothing,
            pad,
        };
        let eval_arg = match (&eval, &eval_refs) {
            (Some(e), Some((c, r))) => Some((e, c.as_slice(), r.as_slice())),
            _ => None,
        };
        let mut metrics = dpo::train(
            ctx.stage_dir(&self.from)?,
            &pairs,
            (&refs.0, &refs.1),
            eval_arg,
            &cfg,
            &self.train.with_lora(self.lora.as_ref(), ctx.seed),
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        super::model_files::record_context(ctx.out_dir, self.max_len)?;
        metrics.insert("pairs".into(), pairs.len() as f64);
        metrics.insert("reference_cache_hit".into(), f64::from(u8::from(hit)));
        Ok(metrics)
    }
}

type Refs = (Vec<f32>, Vec<f32>);

/// Reference log-probs, from the cache when the same reference model (its
/// store key) already scored the same token ids; `true` on a cache hit.
fn cached_reference(
    ctx: &StageContext,
    reference: &Path,
    pairs: &PairExamples,
    pad: usize,
    batch: usize,
) -> Result<(Refs, bool), StageError> {
    let mut h = blake3::Hasher::new();
    let model_key = reference
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    h.update(format!("dpo-reference/1\0{model_key}\0").as_bytes());
    for ex in [&pairs.chosen, &pairs.rejected] {
        for (tokens, trained) in ex.tokens.iter().zip(&ex.trained) {
            h.update(&(tokens.len() as u64).to_le_bytes());
            tokens.iter().for_each(|t| {
                h.update(&t.to_le_bytes());
            });
            trained.iter().for_each(|t| {
                h.update(&[u8::from(*t)]);
            });
        }
    }
    let dir = ctx.cache_dir.join("reference");
    let path = dir.join(format!("{}.bin", h.finalize().to_hex()));
    if let Ok(bytes) = std::fs::read(&path) {
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect();
        if values.len() == 2 * pairs.len() {
            let (c, r) = values.split_at(pairs.len());
            return Ok(((c.to_vec(), r.to_vec()), true));
        }
    }
    let (c, r) = dpo::reference_logprobs(reference, pairs, pad, batch)?;
    let bytes: Vec<u8> = c.iter().chain(&r).flat_map(|x| x.to_le_bytes()).collect();
    // A cache that cannot be written only costs recomputation later.
    let _ = std::fs::create_dir_all(&dir).and_then(|_| {
        let tmp = dir.join(format!(".{}.tmp", std::process::id()));
        std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, &path))
    });
    Ok(((c, r), false))
}
