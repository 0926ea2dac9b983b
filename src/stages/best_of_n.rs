//! `best_of_n`: for each prompt, sample the largest n responses from the
//! policy, score each with the reward model, and for every n listed keep
//! the best of the first n samples (so the n's share samples and rise
//! together). No training at all: the cheap alternative to RL.
//!
//! KL(best-of-n || policy) is at most log n - (n-1)/n (Beirami et al.
//! 2024); it is reported next to each n.
//!
//! Writes `best_of_n.parquet` (one row per prompt and n), `samples.parquet`
//! (every sample with its score) and `demonstrations.parquet` (the largest
//! n's picks as prompt + response, for a further `sft` stage: rejection-
//! sampling finetuning).
//!
//! ```toml
//! [stages.bon]
//! kind = "best_of_n"
//! policy = "sft"
//! reward_model = "rm"
//! prompts = { stage = "world", file = "prompts_test.parquet", max_rows = 200 }
//! n = [1, 4, 16]
//! ```

use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, decode, load_reward_model, pad_id, stop_ids, upstream_tokenizer,
    validate_chat_template, validate_sampling,
};
use super::token_data::load_prompts;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::DataError;
use crate::model::frozen::{FrozenModel, Sampled};
use crate::model::generate::SampleSettings;
use crate::results::stats::best_of_n_kl_bound;

pub const BEST_FILE: &str = "best_of_n.parquet";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestOfNSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// The model that samples. Required.
    pub policy: StageRef,
    /// The reward stage that picks. Required.
    pub reward_model: StageRef,
    /// Prompts to answer. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// The n's to report. Default [1, 4, 16].
    #[serde(default = "default_n")]
    pub n: Vec<usize>,
    /// How samples are drawn. Default temperature 1.0, 48 new tokens.
    #[serde(default)]
    pub sampling: SampleSettings,
    /// Sequences per forward pass. Default 32.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
}

fn default_n() -> Vec<usize> {
    vec![1, 4, 16]
}
fn default_batch_size() -> usize {
    32
}

impl StageKind for BestOfNSettings {
    const KIND: &'static str = "best_of_n";
    const RECIPE_VERSION: u32 = 6;
    const SUMMARY: &'static str = "sample n answers per prompt, keep the reward model's favourite";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            vec![
                Input::stage("policy", &self.policy),
                Input::stage("reward_model", &self.reward_model),
                Input::data("prompts", &self.prompts),
            ]
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if self.n.is_empty() || self.n.contains(&0) {
            return Err((
                "n".into(),
                format!(
                    "list one or more sample counts of at least 1, e.g. [1, 4, 16]; got {:?}",
                    self.n
                ),
            ));
        }
        validate_sampling(self.batch_size, &self.sampling)
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec![
            BEST_FILE.into(),
            "samples.parquet".into(),
            "demonstrations.parquet".into(),
        ])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let (tok, _) = upstream_tokenizer(ctx, &self.policy, self.chat_template.as_deref())?;
        let pad = pad_id(&tok);
        let stops = stop_ids(&tok);
        let prompts = load_prompts(ctx, &self.prompts, &tok)?;
        let policy = FrozenModel::load(ctx.stage_dir(&self.policy)?)?;
        let rm = load_reward_model(ctx, "reward_model", &self.reward_model)?;
        let max_n = *self.n.iter().max().expect("validated non-empty");

        // Sample j of prompt i sits at i * max_n + j.
        ctx.progress
            .set_message(format!("sampling {max_n} per prompt"));
        let sampled = policy.sample(
            &prompts.ids,
            max_n,
            &stops,
            pad,
            &self.sampling,
            ctx.seed,
            self.batch_size,
        );
        ctx.progress.set_message("scoring");
        let sequences: Vec<Vec<usize>> = sampled
            .iter()
            .enumerate()
            .map(|(k, a)| a.sequence(&prompts.ids[k / max_n]))
            .collect();
        let rewards = rm.scores(&sequences, pad, self.batch_size);
        let texts = sampled
            .iter()
            .map(|a| decode(&tok, &a.ids))
            .collect::<Result<Vec<_>, _>>()?;

        let mut samples = df!(
            "prompt" => prompts.rendered.iter().flat_map(|p| std::iter::repeat_n(p.clone(), max_n)).collect::<Vec<_>>(),
            "sample" => (0..sampled.len()).map(|k| (k % max_n) as u32).collect::<Vec<_>>(),
            "response" => texts.clone(),
            "reward" => rewards.clone(),
            "length" => sampled.iter().map(|a| a.ids.len() as u32).collect::<Vec<_>>(),
            "finished" => sampled.iter().map(|a| a.finished).collect::<Vec<_>>(),
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut samples, &ctx.out("samples.parquet"))?;

        let mut ns = self.n.clone();
        ns.sort_unstable();
        ns.dedup();
        let mut best = BestRows::default();
        let mut metrics = Metrics::new();
        for &n in &ns {
            let mut total = 0.0;
            for i in 0..prompts.len() {
                let first = i * max_n;
                // The highest score among the first n; the earliest on ties.
                let pick = (first..first + n)
                    .reduce(|a, b| if rewards[b] > rewards[a] { b } else { a })
                    .expect("n >= 1");
                total += f64::from(rewards[pick]);
                best.push(
                    &prompts.rendered[i],
                    &prompts.questions[i],
                    n,
                    &texts[pick],
                    &sampled[pick],
                    rewards[pick],
                );
            }
            metrics.insert(format!("reward/n={n}"), total / prompts.len() as f64);
            metrics.insert(format!("kl_bound/n={n}"), best_of_n_kl_bound(n));
        }
        best.write(ctx, *ns.last().expect("non-empty"))?;
        metrics.insert("prompts".into(), prompts.len() as f64);
        Ok(metrics)
    }
}

/// The picks, as columns.
#[derive(Default)]
struct BestRows {
    prompt: Vec<String>,
    question: Vec<String>,
    n: Vec<u32>,
    response: Vec<String>,
    response_ids: Vec<Series>,
    reward: Vec<f32>,
    length: Vec<u32>,
    finished: Vec<bool>,
    kl_bound: Vec<f64>,
}

impl BestRows {
    fn push(
        &mut self,
        prompt: &str,
        question: &str,
        n: usize,
        text: &str,
        answer: &Sampled,
        reward: f32,
    ) {
        self.prompt.push(prompt.to_string());
        self.question.push(question.to_string());
        self.n.push(n as u32);
        self.response.push(text.to_string());
        let ids: Vec<u32> = answer.ids.iter().map(|t| *t as u32).collect();
        self.response_ids.push(Series::new("".into(), ids));
        self.reward.push(reward);
        self.length.push(answer.ids.len() as u32);
        self.finished.push(answer.finished);
        self.kl_bound.push(best_of_n_kl_bound(n));
    }

    fn write(self, ctx: &StageContext, largest: usize) -> Result<(), StageError> {
        let keep: Vec<bool> = self.n.iter().map(|n| *n as usize == largest).collect();
        let pick = |v: &[String]| -> Vec<String> {
            v.iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(x, _)| x.clone())
                .collect()
        };
        let mut demos = df!(
            "prompt" => pick(&self.question),
            "response" => pick(&self.response),
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut demos, &ctx.out("demonstrations.parquet"))?;
        let mut df = df!(
            "prompt" => self.prompt,
            "question" => self.question,
            "n" => self.n,
            "response" => self.response,
            "response_ids" => self.response_ids,
            "reward" => self.reward,
            "length" => self.length,
            "finished" => self.finished,
            "kl_bound" => self.kl_bound,
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut df, &ctx.out(BEST_FILE))?;
        Ok(())
    }
}

/// One pick of `best_of_n.parquet`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pick {
    pub response: String,
    /// The answer as sampled: token ids and whether it ended.
    pub answer: Sampled,
}

/// The picks of a `best_of_n.parquet` by (rendered prompt, n), in file
/// order for a prompt listed more than once. A finished answer ended with
/// `stop` (the tokenizer's end-of-turn token).
pub fn read_best(
    df: &DataFrame,
    path: &Path,
    stop: usize,
) -> Result<super::eval::Picks, StageError> {
    let bad = |e: PolarsError| {
        StageError::Failed(format!("{}: not a best_of_n output: {e}", path.display()))
    };
    let text = |c: &str| -> Result<Vec<String>, StageError> {
        Ok(df
            .column(c)
            .and_then(|c| c.str().cloned())
            .map_err(bad)?
            .iter()
            .map(|v| v.unwrap_or("").to_string())
            .collect())
    };
    let (prompt, response) = (text("prompt")?, text("response")?);
    let usizes = |s: &Series| -> Result<Vec<usize>, StageError> {
        Ok(s.cast(&DataType::UInt64)
            .and_then(|s| s.u64().cloned())
            .map_err(bad)?
            .iter()
            .map(|v| v.unwrap_or(0) as usize)
            .collect())
    };
    let n = usizes(df.column("n").map_err(bad)?.as_materialized_series())?;
    let lists = df
        .column("response_ids")
        .and_then(|c| c.list().cloned())
        .map_err(bad)?;
    let finished: Vec<bool> = df
        .column("finished")
        .and_then(|c| c.bool().cloned())
        .map_err(bad)?
        .iter()
        .map(|v| v.unwrap_or(false))
        .collect();
    let mut picks = super::eval::Picks::new();
    for (i, ((prompt, n), (response, finished))) in prompt
        .into_iter()
        .zip(n)
        .zip(response.into_iter().zip(finished))
        .enumerate()
    {
        let ids = match lists.get_as_series(i) {
            Some(s) => usizes(&s)?,
            None => Vec::new(),
        };
        picks.entry((prompt, n)).or_default().push_back(Pick {
            response,
            answer: Sampled {
                ids,
                finished,
                stop: finished.then_some(stop),
            },
        });
    }
    Ok(picks)
}
