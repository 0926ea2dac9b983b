//! `rate`: pointwise ratings from simulated raters, as InstructGPT's
//! labelers scored outputs 1-7 and LAION's volunteers rated answers. Every
//! answer of `data` (each comparison's chosen and rejected answer) is rated
//! by `ratings_per_answer` of `raters` simulated raters: rater k rates an
//! answer whose standardized gold score is z as `round(mid + spread z +
//! bias_k + noise e)` on a 1..`scale` scale, each rater with a bias of sd
//! `bias`, so raters disagree as real ones do (the defaults give about 70%
//! pairwise agreement; the metric `agreement` says how much). Writes
//! `ratings.parquet` (`prompt`, `response`, `rating`, `rater`, `gold`) and
//! `comparisons.parquet`: the answers to a prompt ordered by their mean
//! rating, ties dropped, `margin` the difference of the means. `kto` reads
//! the ratings as labels with a threshold.
//!
//! ```toml
//! [stages.ratings]
//! kind = "rate"
//! gold = "world"
//! data = { stage = "world", file = "comparisons.parquet" }
//! ```

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::model_files::load_world;
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::formats;
use crate::data::gold::GoldLabeler;
use crate::data::ratings::{self, Raters, Rating};
use crate::data::rng::Rng;
use crate::data::DataError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSettings {
    /// A `synth` stage: its gold labeler is the raters' ground truth. Required.
    pub gold: StageRef,
    /// Comparisons whose answers are rated. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub data: DataSource,
    /// Raters in the pool. Default 5.
    #[serde(default = "default_raters")]
    pub raters: usize,
    /// Raters per answer (distinct). Default 2.
    #[serde(default = "default_per_answer")]
    pub ratings_per_answer: usize,
    /// The top of the 1..scale scale. Default 7.
    #[serde(default = "default_scale")]
    pub scale: u32,
    /// Rating points per standard deviation of gold quality. Default 1.5.
    #[serde(default = "default_spread")]
    pub spread: f64,
    /// Each rating's noise, in rating points (sd). Default 1.0.
    #[serde(default = "default_noise")]
    pub noise: f64,
    /// Spread of the raters' personal biases (sd). Default 0.5.
    #[serde(default = "default_bias")]
    pub bias: f64,
}

fn default_raters() -> usize {
    5
}
fn default_per_answer() -> usize {
    2
}
fn default_scale() -> u32 {
    7
}
fn default_spread() -> f64 {
    1.5
}
fn default_noise() -> f64 {
    1.0
}
fn default_bias() -> f64 {
    0.5
}

impl StageKind for RateSettings {
    const KIND: &'static str = "rate";
    // 2: agreement leaves ties out.
    const RECIPE_VERSION: u32 = 2;
    const SUMMARY: &'static str =
        "1-7 ratings of answers by simulated raters, and comparisons from them";

    fn inputs(&self) -> Vec<Input> {
        vec![
            Input::stage("gold", &self.gold),
            Input::data("data", &self.data),
        ]
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if self.raters == 0 || self.ratings_per_answer == 0 || self.ratings_per_answer > self.raters
        {
            return Err((
                "ratings_per_answer".into(),
                format!(
                    "must be between 1 and `raters` = {}, got {}",
                    self.raters, self.ratings_per_answer
                ),
            ));
        }
        if self.scale < 2 {
            return Err((
                "scale".into(),
                format!("must be at least 2, got {}", self.scale),
            ));
        }
        for (field, v) in [
            ("spread", self.spread),
            ("noise", self.noise),
            ("bias", self.bias),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err((
                    field.into(),
                    format!("must be a finite number >= 0, got {v}"),
                ));
            }
        }
        Ok(())
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec!["ratings.parquet".into(), "comparisons.parquet".into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let world = load_world(ctx, "gold", &self.gold)?;
        let gold = GoldLabeler::new(&world);
        let (df, path) = ctx.load(&self.data)?;
        let rows = formats::load_comparisons(&df, &path, self.data.format)?;
        // Each distinct (question, answer) once.
        let mut answers: Vec<(String, String)> = Vec::new();
        for r in &rows {
            let q = r
                .prompt
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map_or_else(String::new, |m| m.content.clone());
            for a in [&r.chosen, &r.rejected] {
                let key = (q.clone(), a.clone());
                if !answers.contains(&key) {
                    answers.push(key);
                }
            }
        }
        let golds: Vec<f64> = answers
            .iter()
            .map(|(q, a)| gold.score(q, a).total)
            .collect();
        let n = golds.len().max(1) as f64;
        let mean = golds.iter().sum::<f64>() / n;
        let sd = (golds.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n)
            .sqrt()
            .max(1e-9);
        let mut rng = Rng::fork(ctx.seed, "raters");
        let raters = Raters::new(
            self.raters,
            self.scale,
            self.spread,
            self.noise,
            self.bias,
            &mut rng,
        );
        let mut all: Vec<Rating> = Vec::new();
        let mut gold_col = Vec::new();
        for ((q, a), g) in answers.iter().zip(&golds) {
            let mut pool: Vec<usize> = (0..raters.len()).collect();
            rng.shuffle(&mut pool);
            for k in pool.into_iter().take(self.ratings_per_answer) {
                all.push(Rating {
                    prompt: q.clone(),
                    response: a.clone(),
                    rating: raters.rate(k, (g - mean) / sd, &mut rng),
                    rater: format!("rater{k}"),
                });
                gold_col.push(*g);
            }
        }
        let mut table = df!(
            "prompt" => all.iter().map(|r| r.prompt.clone()).collect::<Vec<_>>(),
            "response" => all.iter().map(|r| r.response.clone()).collect::<Vec<_>>(),
            "rating" => all.iter().map(|r| r.rating).collect::<Vec<_>>(),
            "rater" => all.iter().map(|r| r.rater.clone()).collect::<Vec<_>>(),
            "gold" => gold_col,
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut table, &ctx.out("ratings.parquet"))?;
        let (pairs, ties) = ratings::to_comparisons(&all);
        if pairs.is_empty() {
            return Err(StageError::Failed(
                "every pair of answers tied on its mean rating: no comparison".into(),
            ));
        }
        let mut comparisons = df!(
            "prompt" => pairs.iter().map(|p| p.0.clone()).collect::<Vec<_>>(),
            "chosen" => pairs.iter().map(|p| p.1.clone()).collect::<Vec<_>>(),
            "rejected" => pairs.iter().map(|p| p.2.clone()).collect::<Vec<_>>(),
            "margin" => pairs.iter().map(|p| p.3).collect::<Vec<_>>(),
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut comparisons, &ctx.out("comparisons.parquet"))?;
        let mut metrics = Metrics::new();
        metrics.insert("answers".into(), answers.len() as f64);
        metrics.insert("ratings".into(), all.len() as f64);
        metrics.insert("comparisons".into(), pairs.len() as f64);
        metrics.insert("ties_dropped".into(), ties as f64);
        metrics.insert("agreement".into(), ratings::agreement(&all));
        Ok(metrics)
    }
}
