//! `results/EXP/runs.parquet`: one row per stage of the last run.
//!
//! Columns: `experiment`, `stage`, `kind`, `key`, `status` ("ran" or
//! "cached"), `duration_s`, `store_path`, and `metrics` (the stage's final
//! metrics as a JSON object, since each kind reports its own).

use std::path::Path;

use polars::prelude::*;

use super::record::RunRecord;
use crate::data::{read_parquet, write_parquet, DataError};

pub const RUNS_FILE: &str = "runs.parquet";

/// Build the runs table of a record, stages in `order`.
pub fn runs_frame(record: &RunRecord, order: &[String]) -> Result<DataFrame, DataError> {
    let rows: Vec<(&String, &super::record::StageRecord)> = order
        .iter()
        .filter_map(|name| record.stages.get(name).map(|s| (name, s)))
        .collect();
    let col = |f: &dyn Fn(&(&String, &super::record::StageRecord)) -> String| -> Vec<String> {
        rows.iter().map(f).collect()
    };
    Ok(df!(
        "experiment" => vec![record.experiment.clone(); rows.len()],
        "stage" => col(&|r| r.0.clone()),
        "kind" => col(&|r| r.1.identity.kind.clone()),
        "key" => col(&|r| r.1.identity.key.clone()),
        "status" => col(&|r| r.1.status.clone()),
        "duration_s" => rows.iter().map(|r| r.1.duration_s).collect::<Vec<f64>>(),
        "store_path" => col(&|r| r.1.store_path.display().to_string()),
        "metrics" => col(&|r| serde_json::to_string(&r.1.metrics).expect("metrics serialize")),
    )?)
}

/// Write the table atomically into `dir`.
pub fn write_runs(df: &mut DataFrame, dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(DataError::io(dir))?;
    let tmp = dir.join(format!(".{RUNS_FILE}.{}.tmp", std::process::id()));
    write_parquet(df, &tmp)?;
    let target = dir.join(RUNS_FILE);
    std::fs::rename(&tmp, &target).map_err(DataError::io(&target))
}

pub fn read_runs(dir: &Path) -> Result<DataFrame, DataError> {
    read_parquet(&dir.join(RUNS_FILE))
}
