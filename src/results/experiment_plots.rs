//! `results/EXP/plots/`: the training curves of every stage that logged
//! per-step metrics, and the reward-vs-KL chart of the evaluated policies
//! (gold reward when the eval has a gold labeler, else the reward model's).

use std::path::{Path, PathBuf};

use polars::prelude::*;

use super::plots::{reward_vs_kl, training_curves, PlotError, PolicyPoint};
use super::record::RunRecord;

pub const PLOTS_DIR: &str = "plots";

/// Redraw every plot of a run into `results_dir/plots/`.
pub fn write_plots(
    record: &RunRecord,
    eval: Option<&DataFrame>,
    results_dir: &Path,
) -> Result<Vec<PathBuf>, PlotError> {
    let dir = results_dir.join(PLOTS_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| PlotError::Io {
        path: dir.clone(),
        source,
    })?;
    let mut written = Vec::new();
    for (name, stage) in &record.stages {
        let metrics = stage.store_path.join("metrics.parquet");
        if metrics.exists() {
            written.extend(training_curves(&metrics, name, &stage.metrics, &dir)?);
        }
    }
    if let Some(df) = eval {
        let points = policy_points(df, false).map_err(|e| PlotError::Draw {
            path: dir.clone(),
            message: e.to_string(),
        })?;
        let title = format!("{}: reward vs KL to the reference", record.experiment);
        written.extend(reward_vs_kl(&points, &title, &dir)?);
    }
    Ok(written)
}

/// One point per eval row: (KL, gold) with the gold interval, or the reward
/// model's score where there is no gold. Labels carry the experiment when
/// `with_experiment`.
pub fn policy_points(df: &DataFrame, with_experiment: bool) -> PolarsResult<Vec<PolicyPoint>> {
    let f = |c: &str| -> PolarsResult<Vec<f64>> {
        Ok(df
            .column(c)?
            .cast(&DataType::Float64)?
            .f64()?
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect())
    };
    let s = |c: &str| -> PolarsResult<Vec<String>> {
        Ok(df
            .column(c)?
            .str()?
            .iter()
            .map(|v| v.unwrap_or("").to_string())
            .collect())
    };
    let (policy, experiment) = (s("policy")?, s("experiment")?);
    let (kl, gold, gl, gh) = (f("kl")?, f("gold")?, f("gold_low")?, f("gold_high")?);
    let (rw, rl, rh) = (f("reward")?, f("reward_low")?, f("reward_high")?);
    Ok((0..df.height())
        .map(|i| {
            let (y, lo, hi) = if gold[i].is_finite() {
                (gold[i], gl[i], gh[i])
            } else {
                (rw[i], rl[i], rh[i])
            };
            PolicyPoint {
                label: if with_experiment {
                    format!("{}/{}", experiment[i], policy[i])
                } else {
                    policy[i].clone()
                },
                kl: kl[i],
                reward: y,
                reward_low: lo,
                reward_high: hi,
                gold: gold[i].is_finite(),
            }
        })
        .collect())
}
