//! `eval`: every listed policy answers the same held-out prompts (same
//! seed), and is measured: the gold labeler's score (when a synthetic world
//! is given) and the reward model's, each a mean with a 95% bootstrap
//! interval, and the paired difference to the baseline; KL to the reference
//! (the sum over response tokens of log pi - log ref on the policy's own
//! samples); win rates against the baseline (ties half); refusal rates on
//! harmful and harmless prompts; response length; perplexity on held-out
//! demonstrations; the reward model's accuracy on held-out comparisons.
//!
//! A policy is a model stage, or a `best_of_n` stage: then each of its n
//! is a row, its answers are the stage's picks for these prompts, and its
//! KL is the analytic bound log n - (n-1)/n against the best-of-n base.
//!
//! Writes `eval.parquet` (one row per policy; columns in [`COLUMNS`]) and
//! `samples.parquet` (every answer with its scores).
//!
//! ```toml
//! [stages.eval]
//! kind = "eval"
//! policies = ["sft", "dpo"]
//! reward_model = "rm"
//! gold = "world"
//! prompts = { stage = "world", file = "prompts_test.parquet", max_rows = 200 }
//! ```

use std::collections::HashMap;
use std::path::Path;

use polars::prelude::*;
use serde::{Deserialize, Serialize};

use super::model_files::{
    chat_template_input, decode, load_reward_model, load_world, pad_id, stop_ids,
    upstream_tokenizer, validate_chat_template,
};
use super::token_data::{load_demonstrations, load_pairs, load_prompts, Prompts};
use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind, StageRef};
use crate::data::gold::{is_refusal, GoldLabeler};
use crate::data::tokenize::{LoadedTokenizer, TokenCache};
use crate::data::world::World;
use crate::data::DataError;
use crate::model::frozen::FrozenModel;
use crate::model::generate::SampleSettings;
use crate::results::stats::{self, Estimate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Chat template: "model" (the model's own when it has one, else
    /// posttrain's; the default), "posttrain", or a `.jinja` file.
    #[serde(
        default,
        deserialize_with = "super::model_files::chat_template_setting",
        skip_serializing_if = "Option::is_none"
    )]
    pub chat_template: Option<String>,
    /// Model stages or best_of_n stages to evaluate. Required, at least one.
    pub policies: Vec<StageRef>,
    /// The model KL is measured against. Default: the first policy that is
    /// a model stage (not a best_of_n stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<StageRef>,
    /// The policy win rates are measured against (one of `policies`).
    /// Default: the first policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<StageRef>,
    /// A reward stage: its scores, win rate and held-out accuracy. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_model: Option<StageRef>,
    /// A `synth` stage whose world's gold labeler judges answers. Optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold: Option<StageRef>,
    /// Held-out prompts. Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub prompts: DataSource,
    /// Held-out demonstrations for perplexity. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub demonstrations: Option<DataSource>,
    /// Held-out comparisons for the reward model's accuracy. Optional.
    #[serde(
        default,
        deserialize_with = "DataSource::optional",
        skip_serializing_if = "Option::is_none"
    )]
    pub comparisons: Option<DataSource>,
    /// How answers are sampled. Default temperature 0.7, 48 new tokens
    /// (fields not given keep these).
    #[serde(
        default = "default_sampling",
        deserialize_with = "sampling_over_default"
    )]
    pub sampling: SampleSettings,
    /// Bootstrap resamples for the confidence intervals. Default 1000.
    #[serde(default = "default_bootstrap")]
    pub bootstrap: usize,
    /// Sequences per forward pass. Default 32.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest demonstration or comparison in tokens. Default 128.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn sampling_over_default<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<SampleSettings, D::Error> {
    super::defaults::merged_over(default_sampling(), d)
}
fn default_sampling() -> SampleSettings {
    SampleSettings {
        temperature: 0.7,
        ..SampleSettings::default()
    }
}
fn default_bootstrap() -> usize {
    1000
}
fn default_batch_size() -> usize {
    32
}
fn default_max_len() -> usize {
    128
}

/// The columns of `eval.parquet`, in order (the runner adds `experiment`
/// and `eval_stage` in front when it gathers them into results/EXP/).
pub const COLUMNS: [&str; 27] = [
    "policy",
    "policy_stage",
    "policy_key",
    "n",
    "prompts",
    "gold",
    "gold_low",
    "gold_high",
    "gold_vs_baseline",
    "gold_vs_baseline_low",
    "gold_vs_baseline_high",
    "reward",
    "reward_low",
    "reward_high",
    "kl",
    "kl_low",
    "kl_high",
    "kl_is_bound",
    "win_rate_gold",
    "win_rate_reward",
    "refusal_harmful",
    "refusal_harmless",
    "length",
    "finished",
    "perplexity",
    "rm_accuracy",
    "baseline",
];

impl StageKind for EvalSettings {
    const KIND: &'static str = "eval";
    const RECIPE_VERSION: u32 = 6;
    const SUMMARY: &'static str =
        "policies on held-out prompts: gold and reward scores, KL, win rate, perplexity";

    fn inputs(&self) -> Vec<Input> {
        let mut all = {
            let mut inputs = Input::stages("policies", &self.policies);
            for (field, r) in [
                ("reference", &self.reference),
                ("baseline", &self.baseline),
                ("reward_model", &self.reward_model),
                ("gold", &self.gold),
            ] {
                inputs.extend(r.as_ref().map(|r| Input::stage(field, r)));
            }
            inputs.push(Input::data("prompts", &self.prompts));
            inputs.extend(
                self.demonstrations
                    .as_ref()
                    .map(|d| Input::data("demonstrations", d)),
            );
            inputs.extend(
                self.comparisons
                    .as_ref()
                    .map(|d| Input::data("comparisons", d)),
            );
            inputs
        };
        all.extend(chat_template_input(self.chat_template.as_deref()));
        all
    }

    fn validate(&self) -> Result<(), (String, String)> {
        validate_chat_template(self.chat_template.as_deref())?;
        if self.policies.is_empty() {
            return Err(("policies".into(), "name at least one stage".into()));
        }
        if let Some(b) = &self.baseline {
            if !self.policies.contains(b) {
                return Err((
                    "baseline".into(),
                    format!(
                        "`{}` is not one of `policies` ({}); add it there",
                        b.name(),
                        names(&self.policies)
                    ),
                ));
            }
        }
        if self.comparisons.is_some() && self.reward_model.is_none() {
            return Err((
                "comparisons".into(),
                "measure a reward model's accuracy: set `reward_model` too".into(),
            ));
        }
        if self.batch_size == 0 || self.bootstrap == 0 || self.sampling.max_new_tokens == 0 {
            return Err((
                "batch_size".into(),
                "`batch_size`, `bootstrap` and `sampling.max_new_tokens` must be at least 1".into(),
            ));
        }
        Ok(())
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec!["eval.parquet".into(), "samples.parquet".into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        Evaluation::new(self, ctx)?.run()
    }
}

fn names(refs: &[StageRef]) -> String {
    refs.iter()
        .map(|r| format!("`{}`", r.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One policy's answers to the prompts, with per-answer measurements.
struct Answers {
    label: String,
    stage: String,
    key: String,
    n: Option<usize>,
    texts: Vec<String>,
    tokens: Vec<usize>,
    finished: Vec<bool>,
    gold: Option<Vec<f64>>,
    reward: Option<Vec<f64>>,
    /// Per-answer KL to the reference, or the analytic bound for best-of-n.
    kl: Vec<f64>,
    kl_is_bound: bool,
    perplexity: f64,
}

struct Evaluation<'a> {
    s: &'a EvalSettings,
    ctx: &'a StageContext<'a>,
    tok: LoadedTokenizer,
    pad: usize,
    stops: Vec<usize>,
    prompts: Prompts,
    world: Option<World>,
    reference: FrozenModel,
    reward_model: Option<FrozenModel>,
}

impl<'a> Evaluation<'a> {
    fn new(s: &'a EvalSettings, ctx: &'a StageContext<'a>) -> Result<Self, StageError> {
        // The reference must be a model: by default the first model policy.
        let is_model = |r: &StageRef| {
            ctx.stage_dir(r)
                .map(|d| d.join("config.json").exists())
                .unwrap_or(false)
        };
        let reference_ref = match &s.reference {
            Some(r) if is_model(r) => r,
            Some(r) => {
                return Err(StageError::Failed(format!(
                    "`reference` = `{}` is not a model stage",
                    r.name()
                )))
            }
            None => s.policies.iter().find(|p| is_model(p)).ok_or_else(|| {
                StageError::Failed(
                    "no policy is a model stage: set `reference` to the model KL is measured against"
                        .into(),
                )
            })?,
        };
        let (tok, _) = upstream_tokenizer(ctx, reference_ref, s.chat_template.as_deref())?;
        let pad = pad_id(&tok);
        let stops = stop_ids(&tok);
        let prompts = load_prompts(ctx, &s.prompts, &tok)?;
        let world = match &s.gold {
            Some(g) => Some(load_world(ctx, "gold", g)?),
            None => None,
        };
        let reference = FrozenModel::load(ctx.stage_dir(reference_ref)?)?;
        let reward_model = match &s.reward_model {
            Some(r) => Some(load_reward_model(ctx, "reward_model", r)?),
            None => None,
        };
        Ok(Evaluation {
            s,
            ctx,
            tok,
            pad,
            stops,
            prompts,
            world,
            reference,
            reward_model,
        })
    }

    fn run(self) -> Result<Metrics, StageError> {
        let ctx = self.ctx;
        let mut cache = TokenCache::new(ctx.cache_dir.join("tokens"));
        let demos = match &self.s.demonstrations {
            Some(d) => Some(load_demonstrations(
                ctx,
                d,
                &self.tok,
                &mut cache,
                self.s.max_len,
            )?),
            None => None,
        };
        let mut all: Vec<Answers> = Vec::new();
        for (i, policy) in self.s.policies.iter().enumerate() {
            ctx.progress.set_message(format!(
                "policy {}/{}: {}",
                i + 1,
                self.s.policies.len(),
                policy.name()
            ));
            let dir = ctx.stage_dir(policy)?;
            if dir.join("config.json").exists() {
                all.push(self.model_answers(policy, dir, demos.as_ref())?);
            } else if dir.join(super::best_of_n::BEST_FILE).exists() {
                all.extend(self.best_of_n_answers(policy, dir)?);
            } else {
                return Err(StageError::Failed(format!(
                    "policy `{}` is neither a model stage nor a best_of_n stage",
                    policy.name()
                )));
            }
        }
        let rm_accuracy = match (&self.s.comparisons, &self.reward_model) {
            (Some(c), Some(rm)) => {
                let pairs = load_pairs(ctx, c, &self.tok, &mut cache, self.s.max_len)?.pairs;
                let ids = |ex: &crate::train::causal_lm::LmExamples| -> Vec<Vec<usize>> {
                    ex.tokens
                        .iter()
                        .map(|t| t.iter().map(|x| *x as usize).collect())
                        .collect()
                };
                let chosen = rm.scores(&ids(&pairs.chosen), self.pad, self.s.batch_size);
                let rejected = rm.scores(&ids(&pairs.rejected), self.pad, self.s.batch_size);
                let (c, r): (Vec<f64>, Vec<f64>) = chosen
                    .iter()
                    .zip(&rejected)
                    .map(|(c, r)| (f64::from(*c), f64::from(*r)))
                    .unzip();
                stats::win_rate(&c, &r)
            }
            _ => f64::NAN,
        };
        self.write(&all, rm_accuracy)
    }

    /// Sample from a model stage and measure each answer.
    fn model_answers(
        &self,
        policy: &StageRef,
        dir: &Path,
        demos: Option<&crate::train::causal_lm::LmExamples>,
    ) -> Result<Answers, StageError> {
        let model = FrozenModel::load(dir)?;
        let s = self.s;
        // The same seed for every policy: each answers the same prompts
        // with the same random stream.
        let answers = model.sample(
            &self.prompts.ids,
            1,
            &self.stops,
            self.pad,
            &s.sampling,
            self.ctx.seed,
            s.batch_size,
        );
        // What was sampled: the response and, when it ended, the end token.
        let sampled: Vec<Vec<usize>> = answers
            .iter()
            .map(crate::model::frozen::Sampled::with_stop)
            .collect();
        let pairs: Vec<(&[usize], &[usize])> = self
            .prompts
            .ids
            .iter()
            .zip(&sampled)
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let own = model.response_logprobs(&pairs, self.pad, s.batch_size);
        let reference = self
            .reference
            .response_logprobs(&pairs, self.pad, s.batch_size);
        let kl = own
            .iter()
            .zip(&reference)
            .map(|(p, r)| stats::sequence_kl(p, r))
            .collect();
        let texts = answers
            .iter()
            .map(|a| decode(&self.tok, &a.ids))
            .collect::<Result<Vec<_>, _>>()?;
        let reward = self.reward_model.as_ref().map(|rm| {
            let seqs: Vec<Vec<usize>> = pairs.iter().map(|(p, r)| [*p, *r].concat()).collect();
            rm.scores(&seqs, self.pad, s.batch_size)
                .into_iter()
                .map(f64::from)
                .collect()
        });
        let perplexity = match demos {
            Some(d) => {
                let ids: Vec<Vec<usize>> = d
                    .tokens
                    .iter()
                    .map(|t| t.iter().map(|x| *x as usize).collect())
                    .collect();
                let splits: Vec<(&[usize], &[usize])> = ids
                    .iter()
                    .zip(&d.trained)
                    .map(|(t, w)| t.split_at(w.iter().position(|x| *x).unwrap_or(t.len())))
                    .collect();
                stats::perplexity(&model.response_logprobs(&splits, self.pad, s.batch_size))
            }
            None => f64::NAN,
        };
        Ok(Answers {
            label: policy.name().to_string(),
            stage: policy.name().to_string(),
            key: store_key(dir),
            n: None,
            gold: self.gold_scores(&texts),
            tokens: answers.iter().map(|a| a.ids.len()).collect(),
            finished: answers.iter().map(|a| a.finished).collect(),
            texts,
            reward,
            kl,
            kl_is_bound: false,
            perplexity,
        })
    }

    /// One row per n of a best_of_n stage: its picks for these prompts.
    fn best_of_n_answers(&self, policy: &StageRef, dir: &Path) -> Result<Vec<Answers>, StageError> {
        let path = dir.join(super::best_of_n::BEST_FILE);
        let df = crate::data::read_parquet(&path)?;
        let mut picks = super::best_of_n::read_best(&df, &path, self.stops[0])?;
        let mut ns: Vec<usize> = picks.keys().map(|(_, n)| *n).collect();
        ns.sort_unstable();
        ns.dedup();
        let mut out = Vec::new();
        for n in ns {
            let mut texts = Vec::with_capacity(self.prompts.len());
            let mut tokens = Vec::with_capacity(self.prompts.len());
            let mut finished = Vec::with_capacity(self.prompts.len());
            let mut sequences = Vec::with_capacity(self.prompts.len());
            for (prompt, ids) in self.prompts.rendered.iter().zip(&self.prompts.ids) {
                // A prompt listed twice has one pick per listing, in order.
                let pick = picks
                    .get_mut(&(prompt.clone(), n))
                    .and_then(|queue| queue.pop_front())
                    .ok_or_else(|| {
                        StageError::Failed(format!(
                            "best_of_n stage `{}` has no answer for the eval prompt {prompt:?}: give it the same `prompts` as the eval",
                            policy.name()
                        ))
                    })?;
                // Scored as sampled: the picked token ids, not re-encoded text.
                sequences.push(pick.answer.sequence(ids));
                texts.push(pick.response);
                tokens.push(pick.answer.ids.len());
                finished.push(pick.answer.finished);
            }
            let reward = self.reward_model.as_ref().map(|rm| {
                rm.scores(&sequences, self.pad, self.s.batch_size)
                    .into_iter()
                    .map(f64::from)
                    .collect()
            });
            out.push(Answers {
                label: format!("{}[n={n}]", policy.name()),
                stage: policy.name().to_string(),
                key: store_key(dir),
                n: Some(n),
                gold: self.gold_scores(&texts),
                texts,
                tokens,
                finished,
                reward,
                kl: vec![stats::best_of_n_kl_bound(n); self.prompts.len()],
                kl_is_bound: true,
                perplexity: f64::NAN,
            });
        }
        Ok(out)
    }

    fn gold_scores(&self, texts: &[String]) -> Option<Vec<f64>> {
        let world = self.world.as_ref()?;
        let gold = GoldLabeler::new(world);
        Some(
            self.prompts
                .questions
                .iter()
                .zip(texts)
                .map(|(q, a)| gold.score(q, a).total)
                .collect(),
        )
    }

    /// Whether each prompt is harmful: its `category` column, else the
    /// world's reading of it; `None` when neither is known.
    fn harmful(&self) -> Vec<Option<bool>> {
        self.prompts
            .categories
            .iter()
            .zip(&self.prompts.questions)
            .map(|(c, q)| match (c, &self.world) {
                (Some(c), _) => Some(c == "harmful"),
                (None, Some(w)) => w.parse_request(q).map(|r| r.category() == "harmful"),
                (None, None) => None,
            })
            .collect()
    }

    fn write(&self, all: &[Answers], rm_accuracy: f64) -> Result<Metrics, StageError> {
        let s = self.s;
        let seed = self.ctx.seed;
        let baseline_name = s.baseline.as_ref().unwrap_or(&s.policies[0]).name();
        let base = all
            .iter()
            .find(|a| a.stage == baseline_name)
            .expect("the baseline is one of the policies");
        let harmful = self.harmful();
        let rate = |a: &Answers, want: bool| -> f64 {
            let refused: Vec<f64> = a
                .texts
                .iter()
                .zip(&harmful)
                .filter(|(_, h)| **h == Some(want))
                .map(|(t, _)| f64::from(u8::from(is_refusal(t))))
                .collect();
            stats::mean(&refused)
        };
        let est = |xs: &Option<Vec<f64>>| match xs {
            Some(x) => stats::bootstrap_mean(x, s.bootstrap, seed),
            None => Estimate::MISSING,
        };
        let paired = |a: &Option<Vec<f64>>, b: &Option<Vec<f64>>| match (a, b) {
            (Some(a), Some(b)) => stats::bootstrap_paired_difference(a, b, s.bootstrap, seed),
            _ => Estimate::MISSING,
        };
        let win = |a: &Option<Vec<f64>>, b: &Option<Vec<f64>>| match (a, b) {
            (Some(a), Some(b)) => stats::win_rate(a, b),
            _ => f64::NAN,
        };

        let mut cols: Vec<Vec<f64>> = vec![Vec::new(); 20];
        let mut metrics = Metrics::new();
        for a in all {
            let gold = est(&a.gold);
            let diff = paired(&a.gold, &base.gold);
            let reward = est(&a.reward);
            let kl = stats::bootstrap_mean(&a.kl, s.bootstrap, seed);
            let lengths: Vec<f64> = a.tokens.iter().map(|t| *t as f64).collect();
            let finished: Vec<f64> = a.finished.iter().map(|f| f64::from(u8::from(*f))).collect();
            let row = [
                gold.mean,
                gold.low,
                gold.high,
                diff.mean,
                diff.low,
                diff.high,
                reward.mean,
                reward.low,
                reward.high,
                kl.mean,
                kl.low,
                kl.high,
                win(&a.gold, &base.gold),
                win(&a.reward, &base.reward),
                rate(a, true),
                rate(a, false),
                stats::mean(&lengths),
                stats::mean(&finished),
                a.perplexity,
                rm_accuracy,
            ];
            for (c, v) in cols.iter_mut().zip(row) {
                c.push(v);
            }
            for (name, v) in [
                ("gold", gold.mean),
                ("reward", reward.mean),
                ("kl", kl.mean),
            ] {
                if v.is_finite() {
                    metrics.insert(format!("{name}/{}", a.label), v);
                }
            }
        }
        if rm_accuracy.is_finite() {
            metrics.insert("rm_accuracy".into(), rm_accuracy);
        }
        let nullable = |v: &[f64]| -> Vec<Option<f64>> {
            v.iter().map(|x| x.is_finite().then_some(*x)).collect()
        };
        let mut columns: Vec<Column> = vec![
            Column::new(
                COLUMNS[0].into(),
                all.iter().map(|a| a.label.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                COLUMNS[1].into(),
                all.iter().map(|a| a.stage.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                COLUMNS[2].into(),
                all.iter().map(|a| a.key.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                COLUMNS[3].into(),
                all.iter()
                    .map(|a| a.n.map(|n| n as u32))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                COLUMNS[4].into(),
                vec![self.prompts.len() as u32; all.len()],
            ),
        ];
        let numeric = COLUMNS[5..26].iter().filter(|c| **c != "kl_is_bound");
        for (name, values) in numeric.zip(&cols) {
            columns.push(Column::new((*name).into(), nullable(values)));
        }
        columns.insert(
            17,
            Column::new(
                "kl_is_bound".into(),
                all.iter().map(|a| a.kl_is_bound).collect::<Vec<_>>(),
            ),
        );
        columns.push(Column::new(
            "baseline".into(),
            vec![base.label.clone(); all.len()],
        ));
        let mut df = DataFrame::new(all.len(), columns).map_err(DataError::from)?;
        let names: Vec<&str> = df.get_column_names().iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names, COLUMNS,
            "eval.parquet's columns are the documented ones"
        );
        crate::data::write_parquet(&mut df, &self.ctx.out("eval.parquet"))?;
        self.write_samples(all)?;
        Ok(metrics)
    }

    fn write_samples(&self, all: &[Answers]) -> Result<(), StageError> {
        let n = self.prompts.len();
        let repeat = |f: &dyn Fn(&Answers) -> String| -> Vec<String> {
            all.iter().flat_map(|a| vec![f(a); n]).collect()
        };
        let scores = |f: &dyn Fn(&Answers) -> Option<&Vec<f64>>| -> Vec<Option<f64>> {
            all.iter()
                .flat_map(|a| match f(a) {
                    Some(v) => v.iter().map(|x| Some(*x)).collect(),
                    None => vec![None; n],
                })
                .collect()
        };
        let mut df = df!(
            "policy" => repeat(&|a| a.label.clone()),
            "prompt" => all.iter().flat_map(|_| self.prompts.questions.clone()).collect::<Vec<_>>(),
            "category" => all.iter().flat_map(|_| self.prompts.categories.clone()).collect::<Vec<_>>(),
            "response" => all.iter().flat_map(|a| a.texts.clone()).collect::<Vec<_>>(),
            "gold" => scores(&|a| a.gold.as_ref()),
            "reward" => scores(&|a| a.reward.as_ref()),
            "kl" => all.iter().flat_map(|a| a.kl.clone()).collect::<Vec<_>>(),
            "length" => all.iter().flat_map(|a| a.tokens.iter().map(|t| *t as u32)).collect::<Vec<_>>(),
            "finished" => all.iter().flat_map(|a| a.finished.clone()).collect::<Vec<_>>(),
        )
        .map_err(DataError::from)?;
        crate::data::write_parquet(&mut df, &self.ctx.out("samples.parquet"))?;
        Ok(())
    }
}

/// A store entry's folder name is its key.
fn store_key(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The best_of_n file's rows by (rendered prompt, n), for eval.
pub type Picks = HashMap<(String, usize), std::collections::VecDeque<super::best_of_n::Pick>>;
