//! `label`: preference data on a policy's own answers, as InstructGPT's
//! labelers compared model outputs. The policy samples `samples` answers
//! to each prompt; the synthetic world's gold labeler (standing in for the
//! human labelers) compares every pair it is not indifferent about, with
//! its label flipped at `label_noise`; the comparisons of `extra` (e.g. the
//! world's comparisons of written answers) are appended. A reward model
//! trained on this has seen the policy's own mistakes, garbled text
//! included, which written comparisons never show it.
//!
//! Pairs with an empty answer (the policy ended its turn at once) are left
//! out: there is no text to compare. Writes `comparisons.parquet` (`prompt`, `chosen`, `rejected`,
//! `category`, `chosen_gold`, `rejected_gold`, `label_flipped`: the world's
//! comparison columns).
//!
//! ```toml
//! [stages.labels]
//! kind = "label"
//! policy = "sft"
//! gold = "world"
//! prompts = { stage = "world", file = "prompts_train.parquet" }
//! extra = { stage = "world", file = "comparisons.parquet" }
//! ```

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, decode, load_reward_model, load_world, pad_id, stop_ids,
    upstream_tokenizer, validate_chat_template, validate_sampling,
};
use super::token_data::load_prompts;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::gold::GoldLabeler;
use crate::data::rng::Rng;
use crate::data::DataError;
use crate::model::frozen::FrozenModel;
use crate::model::generate::SampleSettings;

pub const OUTPUT: &str = "comparisons.parquet";

/// The answer pairs (a, b), a < b, to label for one prompt: every pair, or
/// the best and the worst non-empty answers by `scores`.
fn candidate_pairs(scores: &[f64], texts: &[String], pairs: Pairs) -> Vec<(usize, usize)> {
    let k = scores.len();
    match pairs {
        Pairs::All => (0..k)
            .flat_map(|a| (a + 1..k).map(move |b| (a, b)))
            .collect(),
        Pairs::BestWorst => {
            let live: Vec<usize> = (0..k).filter(|i| !texts[*i].trim().is_empty()).collect();
            let best = live
                .iter()
                .copied()
                .max_by(|x, y| scores[*x].total_cmp(&scores[*y]));
            let worst = live
                .iter()
                .copied()
                .min_by(|x, y| scores[*x].total_cmp(&scores[*y]));
            match (best, worst) {
                (Some(b), Some(w)) if b != w => vec![(b.min(w), b.max(w))],
                _ => Vec::new(),
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// The model whose answers are labeled. Required.
    pub policy: StageRef,
    /// A `synth` stage: its world's gold labeler labels (and fills the
    /// `*_gold` columns). Required.
    pub gold: StageRef,
    /// A reward stage that labels instead of the gold labeler (AI
    /// feedback: RLAIF, Llama 3's rounds). Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<StageRef>,
    /// "all" ordered pairs the labeler is not indifferent about (default),
    /// or "best_worst": one pair per prompt, its best against its worst
    /// answer (Llama 3's recipe).
    #[serde(default, skip_serializing_if = "Pairs::is_all")]
    pub pairs: Pairs,
    /// Prompts to answer. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// Answers per prompt (up to K(K-1)/2 comparisons each). Default 4.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Probability that a label is flipped (labeler noise). Default 0.1.
    #[serde(default = "default_noise")]
    pub label_noise: f64,
    /// Comparisons appended to the labeled ones (same columns). Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub extra: Option<DataSource>,
    /// How the policy samples. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
    /// Sequences per forward pass. Default 32.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pairs {
    #[default]
    All,
    BestWorst,
}

impl Pairs {
    fn is_all(&self) -> bool {
        *self == Pairs::All
    }
}

fn default_samples() -> usize {
    4
}
fn default_noise() -> f64 {
    0.1
}
fn default_batch_size() -> usize {
    32
}

impl StageKind for LabelSettings {
    const KIND: &'static str = "label";
    const RECIPE_VERSION: u32 = 5;
    const SUMMARY: &'static str =
        "gold-label comparisons of a policy's own answers (preference data collection)";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            let mut inputs = vec![
                Input::stage("policy", &self.policy),
                Input::stage("gold", &self.gold),
                Input::data("prompts", &self.prompts),
            ];
            inputs.extend(self.judge.as_ref().map(|j| Input::stage("judge", j)));
            inputs.extend(self.extra.as_ref().map(|e| Input::data("extra", e)));
            inputs
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if self.samples < 2 {
            return Err((
                "samples".into(),
                format!(
                    "a comparison needs at least 2 answers per prompt, got {}",
                    self.samples
                ),
            ));
        }
        if !(0.0..0.5).contains(&self.label_noise) {
            return Err((
                "label_noise".into(),
                format!("must be in [0, 0.5), got {}", self.label_noise),
            ));
        }
        validate_sampling(self.batch_size, &self.sampling)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec![OUTPUT.into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let world = load_world(ctx, "gold", &self.gold)?;
        let gold = GoldLabeler::new(&world);
        let (tok, _) = upstream_tokenizer(ctx, &self.policy, self.chat_template.as_deref())?;
        let pad = pad_id(&tok);
        let stops = stop_ids(&tok);
        let prompts = load_prompts(ctx, &self.prompts, &tok)?;
        let policy = FrozenModel::load(ctx.stage_dir(&self.policy)?)?;
        let k = self.samples;
        ctx.progress.set_message(format!("sampling {k} per prompt"));
        let answers = policy.sample(
            &prompts.ids,
            k,
            &stops,
            pad,
            &self.sampling,
            ctx.seed,
            self.batch_size,
        );
        let texts = answers
            .iter()
            .map(|a| decode(&tok, &a.ids))
            .collect::<Result<Vec<_>, _>>()?;
        // The AI judge's scores, when one labels.
        let judged: Option<Vec<f64>> = match &self.judge {
            Some(j) => {
                ctx.progress.set_message("judging");
                let rm = load_reward_model(ctx, "judge", j)?;
                let sequences: Vec<Vec<usize>> = answers
                    .iter()
                    .enumerate()
                    .map(|(n, a)| a.sequence(&prompts.ids[n / k]))
                    .collect();
                Some(
                    rm.scores(&sequences, pad, self.batch_size)
                        .into_iter()
                        .map(f64::from)
                        .collect(),
                )
            }
            None => None,
        };

        let mut rng = Rng::fork(ctx.seed, "label-noise");
        let mut out = Columns::default();
        let mut skipped_empty = 0usize;
        for (i, question) in prompts.questions.iter().enumerate() {
            let category = world
                .parse_request(question)
                .map_or("unknown", |r| r.category())
                .to_string();
            let golds: Vec<f64> = (0..k)
                .map(|j| gold.score(question, &texts[i * k + j]).total)
                .collect();
            let scores: Vec<f64> = match &judged {
                Some(j) => j[i * k..(i + 1) * k].to_vec(),
                None => golds.clone(),
            };
            for (a, b) in candidate_pairs(&scores, &texts[i * k..(i + 1) * k], self.pairs) {
                if (scores[a] - scores[b]).abs() < 1e-9 {
                    continue; // the labeler has no preference
                }
                if texts[i * k + a].trim().is_empty() || texts[i * k + b].trim().is_empty() {
                    // An empty answer (the end token first) is no
                    // text to compare; comparison readers refuse it.
                    skipped_empty += 1;
                    continue;
                }
                let flip = rng.chance(self.label_noise);
                let (w, l) = if (scores[a] > scores[b]) != flip {
                    (a, b)
                } else {
                    (b, a)
                };
                out.prompt.push(question.clone());
                out.chosen.push(texts[i * k + w].clone());
                out.rejected.push(texts[i * k + l].clone());
                out.category.push(category.clone());
                out.chosen_gold.push(golds[w]);
                out.rejected_gold.push(golds[l]);
                out.flipped.push(flip);
            }
        }
        let labeled = out.prompt.len();
        let mut df = df!(
            "prompt" => out.prompt,
            "chosen" => out.chosen,
            "rejected" => out.rejected,
            "category" => out.category,
            "chosen_gold" => out.chosen_gold,
            "rejected_gold" => out.rejected_gold,
            "label_flipped" => out.flipped,
        )
        .map_err(DataError::from)?;
        if let Some(extra) = &self.extra {
            let (more, path) = ctx.load(extra)?;
            let more = if more.column("chosen_gold").is_ok() {
                more
            } else {
                extra_comparisons(&more, &path, extra.format)?
            };
            let names: Vec<String> = df
                .get_column_names()
                .iter()
                .map(|c| c.to_string())
                .collect();
            let more = more.select(names.clone()).map_err(|e| {
                StageError::Failed(format!(
                    "{}: `extra` needs the columns {}: {e}",
                    path.display(),
                    names.join(", ")
                ))
            })?;
            df = df.vstack(&more).map_err(|e| {
                StageError::Failed(format!(
                    "{}: `extra` columns do not match the labeled ones: {e}",
                    path.display()
                ))
            })?;
        }
        if df.height() == 0 {
            return Err(StageError::Failed(
                "no comparison: the gold labeler scored every pair of answers the same".into(),
            ));
        }
        crate::data::write_parquet(&mut df, &ctx.out(OUTPUT))?;
        let mut metrics = Metrics::new();
        metrics.insert("labeled_comparisons".into(), labeled as f64);
        metrics.insert("comparisons".into(), df.height() as f64);
        metrics.insert("prompts".into(), prompts.len() as f64);
        metrics.insert("skipped_empty_pairs".into(), skipped_empty as f64);
        Ok(metrics)
    }
}

/// Comparisons in any format `formats` reads (TRL's columns, messages,
/// implicit prompts, HH-RLHF, rankings) as the labeled columns, with no
/// gold scores and no flip; the prompt must be a single user turn, as the
/// labeled ones are.
fn extra_comparisons(
    df: &DataFrame,
    path: &std::path::Path,
    format: Option<crate::data::formats::Format>,
) -> Result<DataFrame, StageError> {
    let rows = crate::data::formats::load_comparisons(df, path, format)?;
    let mut prompt = Vec::with_capacity(rows.len());
    for (i, r) in rows.iter().enumerate() {
        match r.prompt.as_slice() {
            [m] if m.role == "user" => prompt.push(m.content.clone()),
            _ => {
                return Err(StageError::Failed(format!(
                    "{}: `extra`, row {i}: the prompt must be one user turn (labeled comparisons are single-turn)",
                    path.display()
                )))
            }
        }
    }
    let n = rows.len();
    let category: Vec<String> = vec!["unknown".to_string(); n];
    let gold: Vec<Option<f64>> = vec![None; n];
    let flipped: Vec<Option<bool>> = vec![None; n];
    let out = df!(
        "prompt" => prompt,
        "chosen" => rows.iter().map(|r| r.chosen.clone()).collect::<Vec<_>>(),
        "rejected" => rows.iter().map(|r| r.rejected.clone()).collect::<Vec<_>>(),
        "category" => category,
        "chosen_gold" => gold.clone(),
        "rejected_gold" => gold,
        "label_flipped" => flipped,
    )
    .map_err(crate::data::DataError::from)?;
    Ok(out)
}

#[derive(Default)]
struct Columns {
    prompt: Vec<String>,
    chosen: Vec<String>,
    rejected: Vec<String>,
    category: Vec<String>,
    chosen_gold: Vec<f64>,
    rejected_gold: Vec<f64>,
    flipped: Vec<bool>,
}
