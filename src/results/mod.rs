//! Result tables of experiments: `results/EXP/runs.parquet` (one row per
//! stage of the last run), `results/EXP/last_run.json` (what each stage's
//! key was made of, for `plan` and `gc`), `results/EXP/eval.parquet` (one
//! row per evaluated policy), plots, the HTML report, the statistics of
//! evaluation, and comparing experiments.

pub mod compare;
pub mod eval_table;
pub mod experiment_plots;
pub mod plots;
pub mod record;
pub mod report;
pub mod runs_table;
pub mod stats;

use std::path::{Path, PathBuf};

/// `results/EXP/` under the project root.
pub fn experiment_dir(root: &Path, experiment: &str) -> PathBuf {
    root.join("results").join(experiment)
}
