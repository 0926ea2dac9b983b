//! `kto`: Kahneman-Tversky optimisation from unpaired labels: each
//! comparison of `data` becomes two examples, its chosen answer desirable
//! and its rejected one undesirable (TRL's conversion of paired data), or
//! `data` is TRL's unpaired format (`prompt`, `completion`, `label`), or
//! each answer of `ratings` is desirable when its mean rating reaches
//! `threshold`; and
//! the policy trains against the frozen `reference` (default `from`). See
//! `train/kto.rs` for the loss. The weights are checked against the
//! paper's balance rule and a warning is printed when outside it.
//!
//! ```toml
//! [stages.kto]
//! kind = "kto"
//! from = "sft"
//! data = { stage = "world", file = "comparisons.parquet" }
//! beta = 0.1
//! ```

use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, copy_tokenizer, model_outputs, pad_id, upstream_tokenizer,
    validate_chat_template, validate_finetune,
};
use super::token_data::load_pairs;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::chat::Message;
use crate::data::formats::{self, Demonstration, Format};
use crate::data::ratings;
use crate::data::tokenize::{self, TokenCache};
use crate::train::causal_lm::LmExamples;
use crate::train::dpo::{self, PairExamples};
use crate::train::kto::{self, KtoConfig, KtoExamples};
use crate::train::optim::TrainSettings;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSettings {
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
    /// The frozen reference. Default: the `from` stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// Comparisons, split into desirable (chosen) and undesirable
    /// (rejected) examples, or TRL's unpaired rows (`prompt`,
    /// `completion`, `label`). This or `ratings` is required.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub data: Option<DataSource>,
    /// Pointwise ratings (`prompt`, `response`, `rating`, optional `rater`,
    /// e.g. a `rate` stage's `ratings.parquet`): each answer desirable when
    /// its mean rating reaches `threshold`.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub ratings: Option<DataSource>,
    /// With `ratings`: the mean rating from which an answer is desirable.
    /// Default 5 (of 1-7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// Held-out comparisons: the implicit reward's accuracy. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_data: Option<DataSource>,
    /// Default 0.1 (TRL).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Default 1.0 (TRL).
    #[serde(default = "default_weight")]
    pub desirable_weight: f64,
    /// Default 1.0 (TRL).
    #[serde(default = "default_weight")]
    pub undesirable_weight: f64,
    /// Longest prompt + completion in tokens. Default 128.
    #[serde(default = "super::orpo::default_max_len")]
    pub max_len: usize,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_beta() -> f64 {
    0.1
}
pub(crate) const DEFAULT_THRESHOLD: f64 = 5.0;
fn default_weight() -> f64 {
    1.0
}

/// Split a sequence where training starts: (prompt, completion).
fn split(tokens: &[u32], trained: &[bool]) -> (Vec<u32>, Vec<u32>) {
    let k = trained.iter().position(|t| *t).unwrap_or(tokens.len());
    (tokens[..k].to_vec(), tokens[k..].to_vec())
}

/// Chosen answers desirable, rejected ones not, interleaved.
fn split_pairs(pairs: &PairExamples) -> (LmExamples, Vec<bool>) {
    let mut examples = LmExamples::default();
    let mut desirable = Vec::new();
    for i in 0..pairs.len() {
        for (ex, label) in [(&pairs.chosen, true), (&pairs.rejected, false)] {
            examples.tokens.push(ex.tokens[i].clone());
            examples.trained.push(ex.trained[i].clone());
            desirable.push(label);
        }
    }
    (examples, desirable)
}

/// Labeled examples with their mismatched pairs: each example's prompt
/// with the completion two examples on (for split comparisons, the next
/// comparison's answer of the same label).
fn unpaired(examples: LmExamples, desirable: Vec<bool>, max_len: usize) -> KtoExamples {
    let n = examples.len();
    let mut mismatched = LmExamples::default();
    for i in 0..n {
        let (prompt, _) = split(&examples.tokens[i], &examples.trained[i]);
        let j = (i + 2) % n;
        let (_, completion) = split(&examples.tokens[j], &examples.trained[j]);
        let mut tokens = [prompt.clone(), completion.clone()].concat();
        let mut trained: Vec<bool> = std::iter::repeat_n(false, prompt.len())
            .chain(std::iter::repeat_n(true, completion.len()))
            .collect();
        tokens.truncate(max_len);
        trained.truncate(max_len);
        mismatched.tokens.push(tokens);
        mismatched.trained.push(trained);
    }
    KtoExamples {
        examples,
        desirable,
        mismatched,
    }
}

impl KtoSettings {
    fn threshold(&self) -> f64 {
        self.threshold.unwrap_or(DEFAULT_THRESHOLD)
    }

    /// Examples and labels from a ratings table.
    fn rated(
        &self,
        ctx: &StageContext,
        source: &DataSource,
        tok: &crate::chat::LoadedTokenizer,
        cache: &mut TokenCache,
    ) -> Result<(LmExamples, Vec<bool>), StageError> {
        let (df, path) = ctx.load(source)?;
        let labels = ratings::to_labels(&ratings::read(&df, &path)?, self.threshold());
        let rows: Vec<(Demonstration, bool)> = labels
            .iter()
            .map(|(p, r, label)| {
                let row = Demonstration {
                    prompt: vec![Message::user(p)],
                    response: r.clone(),
                };
                (row, *label)
            })
            .collect();
        let why = format!("with `threshold` = {}", self.threshold());
        self.labeled(&rows, &path, &why, tok, cache)
    }

    /// Examples and labels from TRL's unpaired rows (`prompt`,
    /// `completion`, `label`); `None` when `source` holds another format.
    fn unpaired_rows(
        &self,
        ctx: &StageContext,
        source: &DataSource,
        tok: &crate::chat::LoadedTokenizer,
        cache: &mut TokenCache,
    ) -> Result<Option<(LmExamples, Vec<bool>)>, StageError> {
        let (df, path) = ctx.load(source)?;
        if source.format.or_else(|| Format::detect(&df)) != Some(Format::Unpaired) {
            return Ok(None);
        }
        let rows: Vec<(Demonstration, bool)> = formats::load_unpaired(&df, &path)?
            .into_iter()
            .map(|u| {
                let row = Demonstration {
                    prompt: u.prompt,
                    response: u.completion,
                };
                (row, u.desirable)
            })
            .collect();
        self.labeled(&rows, &path, "in `label`", tok, cache)
            .map(Some)
    }

    /// Labeled answers as token ids, cut to `max_len`; both labels needed.
    fn labeled(
        &self,
        rows: &[(Demonstration, bool)],
        path: &std::path::Path,
        why: &str,
        tok: &crate::chat::LoadedTokenizer,
        cache: &mut TokenCache,
    ) -> Result<(LmExamples, Vec<bool>), StageError> {
        let demos: Vec<Demonstration> = rows.iter().map(|(d, _)| d.clone()).collect();
        let table = tokenize::demonstrations(tok, &demos, cache)?;
        let mut examples = LmExamples::default();
        let mut desirable = Vec::new();
        for ((tokens, trained), (_, label)) in table
            .column("tokens")
            .iter()
            .zip(table.column("trained"))
            .zip(rows)
        {
            let mut tokens = tokens.clone();
            let mut trained: Vec<bool> = trained.iter().map(|t| *t == 1).collect();
            tokens.truncate(self.max_len);
            trained.truncate(self.max_len);
            if trained.iter().any(|t| *t) {
                examples.tokens.push(tokens);
                examples.trained.push(trained);
                desirable.push(*label);
            }
        }
        if desirable.iter().all(|d| *d) || !desirable.iter().any(|d| *d) {
            return Err(StageError::Failed(format!(
                "{}: {why} every answer is {}: KTO needs both labels",
                path.display(),
                if desirable.first() == Some(&true) {
                    "desirable"
                } else {
                    "undesirable"
                }
            )));
        }
        Ok((examples, desirable))
    }
}

impl StageKind for KtoSettings {
    const KIND: &'static str = "kto";
    // 2: config.json's max_position_embeddings is the trained max_len.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str = "KTO: desirable / undesirable labels against a frozen reference";

    fn inputs(&self) -> Vec<Input> {
        let mut all = vec![Input::stage("from", &self.from)];
        all.extend(self.data.as_ref().map(|d| Input::data("data", d)));
        all.extend(self.ratings.as_ref().map(|d| Input::data("ratings", d)));
        all.extend(self.eval_data.as_ref().map(|d| Input::data("eval_data", d)));
        all.extend(
            self.reference
                .as_ref()
                .map(|r| Input::stage("reference", r)),
        );
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if self.data.is_some() == self.ratings.is_some() {
            return Err((
                "data".into(),
                "give either `data` (comparisons to split) or `ratings` (labeled by `threshold`)"
                    .into(),
            ));
        }
        if let Some(t) = self.threshold {
            if !t.is_finite() || self.ratings.is_none() {
                return Err((
                    "threshold".into(),
                    format!("applies to `ratings` and must be a number, got {t}"),
                ));
            }
        }
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err((
                "beta".into(),
                format!("must be positive, got {}", self.beta),
            ));
        }
        for (field, w) in [
            ("desirable_weight", self.desirable_weight),
            ("undesirable_weight", self.undesirable_weight),
        ] {
            if !(w > 0.0 && w.is_finite()) {
                return Err((field.into(), format!("must be positive, got {w}")));
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
        let (examples, desirable) = match (&self.data, &self.ratings) {
            (Some(d), _) => match self.unpaired_rows(ctx, d, &tok, &mut cache)? {
                Some(labeled) => labeled,
                None => split_pairs(&load_pairs(ctx, d, &tok, &mut cache, self.max_len)?.pairs),
            },
            (None, Some(r)) => self.rated(ctx, r, &tok, &mut cache)?,
            (None, None) => unreachable!("validated: data or ratings"),
        };
        let data = unpaired(examples, desirable, self.max_len);
        let cfg = KtoConfig {
            beta: self.beta,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
            pad: pad_id(&tok),
        };
        let n_d = data.desirable.iter().filter(|d| **d).count();
        if let Some(w) = kto::balance_warning(&cfg, n_d, data.desirable.len() - n_d) {
            ctx.progress.suspend(|| eprintln!("warning: {w}"));
        }
        let reference = ctx.stage_dir(self.reference.as_ref().unwrap_or(&self.from))?;
        ctx.progress.set_message("reference log-probs");
        let b = self.train.batch_size;
        let refs = kto::reference_logprobs(reference, &data, cfg.pad, b)?;
        let eval = match &self.eval_data {
            Some(e) => {
                let pairs = load_pairs(ctx, e, &tok, &mut cache, self.max_len)?.pairs;
                let (c, r) = dpo::reference_logprobs(reference, &pairs, cfg.pad, b)?;
                Some((pairs, c, r))
            }
            None => None,
        };
        let mut metrics = kto::train(
            ctx.stage_dir(&self.from)?,
            &data,
            (&refs.0, &refs.1),
            eval.as_ref()
                .map(|(p, c, r)| (p, c.as_slice(), r.as_slice())),
            &cfg,
            &self.train,
            ctx.seed,
            ctx.out_dir,
            &ctx.checkpoints(),
            ctx.progress,
        )?;
        copy_tokenizer(&tok, &tok_path, ctx.out_dir)?;
        super::model_files::record_context(ctx.out_dir, self.max_len)?;
        metrics.insert("examples".into(), data.desirable.len() as f64);
        metrics.insert("desirable".into(), n_d as f64);
        Ok(metrics)
    }
}
