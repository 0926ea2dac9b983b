//! `results/EXP/eval.parquet`: the rows of every `eval` stage of the last
//! run (one per policy), with `experiment` and `eval_stage` in front. The
//! columns after those are the eval stage's, listed in README.md.

use std::path::Path;

use polars::prelude::*;

use super::record::RunRecord;
use crate::data::{read_parquet, write_parquet, DataError};

pub const EVAL_FILE: &str = "eval.parquet";

/// The columns `posttrain run` prints after an experiment with an eval.
pub const SUMMARY_COLUMNS: [&str; 12] = [
    "policy",
    "gold",
    "gold_low",
    "gold_high",
    "gold_vs_baseline",
    "gold_vs_baseline_low",
    "reward",
    "kl",
    "win_rate_gold",
    "refusal_harmful",
    "refusal_harmless",
    "length",
];

/// The eval rows of `record`'s eval stages (in `order`), or `None` when it has none.
pub fn gather(record: &RunRecord, order: &[String]) -> Result<Option<DataFrame>, DataError> {
    let mut out: Option<DataFrame> = None;
    for name in order {
        let Some(stage) = record.stages.get(name) else {
            continue;
        };
        if stage.identity.kind != "eval" {
            continue;
        }
        let mut df = read_parquet(&stage.store_path.join(EVAL_FILE))?;
        let n = df.height();
        df.insert_column(0, Column::new("eval_stage".into(), vec![name.clone(); n]))?;
        df.insert_column(
            0,
            Column::new("experiment".into(), vec![record.experiment.clone(); n]),
        )?;
        out = Some(match out {
            None => df,
            Some(prev) => prev.vstack(&df)?,
        });
    }
    Ok(out)
}

/// Write (or, with no eval rows, remove) `dir/eval.parquet` atomically.
pub fn write_eval(df: Option<&mut DataFrame>, dir: &Path) -> Result<(), DataError> {
    let target = dir.join(EVAL_FILE);
    let Some(df) = df else {
        if target.exists() {
            std::fs::remove_file(&target).map_err(DataError::io(&target))?;
        }
        return Ok(());
    };
    let tmp = dir.join(format!(".{EVAL_FILE}.{}.tmp", std::process::id()));
    write_parquet(df, &tmp)?;
    std::fs::rename(&tmp, &target).map_err(DataError::io(&target))
}

pub fn read_eval(dir: &Path) -> Result<DataFrame, DataError> {
    read_parquet(&dir.join(EVAL_FILE))
}

/// The eval table's summary columns (those present), rounded for a terminal.
pub fn summary(df: &DataFrame) -> Result<DataFrame, PolarsError> {
    let mut columns = Vec::new();
    for name in ["experiment", "eval_stage"].iter().chain(&SUMMARY_COLUMNS) {
        if let Ok(c) = df.column(name) {
            let c = match c.dtype() {
                DataType::Float64 | DataType::Float32 => {
                    let values: Vec<Option<f64>> = c
                        .cast(&DataType::Float64)?
                        .f64()?
                        .iter()
                        .map(|v| v.map(|x| (x * 1000.0).round() / 1000.0))
                        .collect();
                    Column::new(c.name().clone(), values)
                }
                _ => c.clone(),
            };
            columns.push(c);
        }
    }
    DataFrame::new(df.height(), columns)
}

/// The summary for a terminal `width` characters wide: the summary columns
/// and `win_rate_reward`, without those that have no value in any row (no
/// gold labeler: no gold columns), then the last ones dropped until it fits.
pub fn summary_fitting(df: &DataFrame, width: usize) -> Result<DataFrame, PolarsError> {
    let mut names: Vec<&str> = vec!["experiment", "eval_stage"];
    for c in SUMMARY_COLUMNS {
        names.push(c);
        if c == "win_rate_gold" {
            names.push("win_rate_reward");
        }
    }
    let mut columns = Vec::new();
    for name in names {
        let Ok(c) = df.column(name) else {
            continue;
        };
        let c = match c.dtype() {
            DataType::Float64 | DataType::Float32 => {
                let values: Vec<Option<f64>> = c
                    .cast(&DataType::Float64)?
                    .f64()?
                    .iter()
                    .map(|v| {
                        v.filter(|x| x.is_finite())
                            .map(|x| (x * 1000.0).round() / 1000.0)
                    })
                    .collect();
                if values.iter().all(Option::is_none) {
                    continue;
                }
                Column::new(c.name().clone(), values)
            }
            _ if c.null_count() == c.len() => continue,
            _ => c.clone(),
        };
        columns.push(c);
    }
    // Polars draws "│ a ┆ b │": a cell is its text and three characters.
    let cell_width = |c: &Column| -> usize {
        let longest = (0..c.len())
            .map(|i| match c.get(i) {
                Ok(AnyValue::String(s)) => s.chars().count(),
                Ok(AnyValue::Null) | Err(_) => 4,
                Ok(v) => v.to_string().len(),
            })
            .max()
            .unwrap_or(0);
        c.name().chars().count().max(longest) + 3
    };
    while columns.len() > 3 && columns.iter().map(cell_width).sum::<usize>() + 1 > width {
        columns.pop();
    }
    DataFrame::new(df.height(), columns)
}
