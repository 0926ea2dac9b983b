//! `posttrain compare`: the eval rows of several experiments in one table
//! (one row per evaluated policy), or their last runs (one row per stage,
//! one column per final metric), and for two experiments the
//! settings that differ between stages of the same name, like
//! `dvc exp show --only-changed`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use polars::prelude::*;

use super::record::RunRecord;
use super::runs_table::read_runs;
use crate::data::{write_parquet, DataError};

/// Leading columns of the eval comparison.
pub const EVAL_ID_COLUMNS: [&str; 3] = ["experiment", "eval_stage", "policy"];

/// Fixed leading columns of the runs comparison.
pub const ID_COLUMNS: [&str; 5] = ["experiment", "stage", "kind", "status", "duration_s"];

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("experiment `{0}` has no results yet: run it first (posttrain run {0})")]
    NoResults(String),
    #[error("no column `{column}` in the comparison{hint}; columns: {available}")]
    UnknownColumn {
        column: String,
        hint: String,
        available: String,
    },
    #[error("cannot write `{0}`: use a .parquet or .csv file name")]
    BadOutput(String),
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Polars(#[from] PolarsError),
}

/// Id columns, duration and metrics of one stage row.
type CompareRow = (BTreeMap<&'static str, String>, f64, BTreeMap<String, f64>);

/// One wide table of the experiments' runs.
pub fn compare_table(root: &Path, experiments: &[String]) -> Result<DataFrame, CompareError> {
    let mut rows: Vec<CompareRow> = Vec::new();
    let mut frames = Vec::new();
    for exp in experiments {
        let dir = super::experiment_dir(root, exp);
        let df = read_runs(&dir).map_err(|_| CompareError::NoResults(exp.clone()))?;
        frames.push(df);
    }
    for df in &frames {
        let s = |c: &str| -> Result<Vec<String>, PolarsError> {
            Ok(df
                .column(c)?
                .str()?
                .iter()
                .map(|v| v.unwrap_or("").to_string())
                .collect())
        };
        let (e, st, k, status, metrics) = (
            s("experiment")?,
            s("stage")?,
            s("kind")?,
            s("status")?,
            s("metrics")?,
        );
        let dur: Vec<f64> = df
            .column("duration_s")?
            .f64()?
            .iter()
            .map(|v| v.unwrap_or(f64::NAN))
            .collect();
        for i in 0..df.height() {
            let ids = BTreeMap::from([
                ("experiment", e[i].clone()),
                ("stage", st[i].clone()),
                ("kind", k[i].clone()),
                ("status", status[i].clone()),
            ]);
            let m: BTreeMap<String, f64> = serde_json::from_str(&metrics[i]).unwrap_or_default();
            rows.push((ids, dur[i], m));
        }
    }
    let metric_names: BTreeSet<String> = rows.iter().flat_map(|r| r.2.keys().cloned()).collect();
    let mut columns: Vec<Column> = ["experiment", "stage", "kind", "status"]
        .iter()
        .map(|c| {
            Column::new(
                (*c).into(),
                rows.iter().map(|r| r.0[c].clone()).collect::<Vec<_>>(),
            )
        })
        .collect();
    columns.push(Column::new(
        "duration_s".into(),
        rows.iter().map(|r| r.1).collect::<Vec<_>>(),
    ));
    for name in &metric_names {
        let values: Vec<Option<f64>> = rows.iter().map(|r| r.2.get(name).copied()).collect();
        columns.push(Column::new(name.as_str().into(), values));
    }
    Ok(DataFrame::new_infer_height(columns)?)
}

/// The eval rows (one per policy) of every experiment that has an eval
/// table, or `None` when none has; an experiment never run is an error.
pub fn eval_table(root: &Path, experiments: &[String]) -> Result<Option<DataFrame>, CompareError> {
    let mut out: Option<DataFrame> = None;
    for exp in experiments {
        let dir = super::experiment_dir(root, exp);
        if read_runs(&dir).is_err() {
            return Err(CompareError::NoResults(exp.clone()));
        }
        let Ok(df) = super::eval_table::read_eval(&dir) else {
            continue;
        };
        out = Some(match out {
            None => df,
            Some(prev) => prev.vstack(&df)?,
        });
    }
    Ok(out)
}

/// Columns for the values a `matrix` swept, read from the names in
/// `name_column` (`dpo@beta=0.05,lr=1e-4` gives `beta` = 0.05, `lr` = 1e-4;
/// empty for other rows), placed after the id columns. Returns the table
/// and the new columns' names (none when nothing was swept).
pub fn with_swept_columns(
    df: DataFrame,
    name_column: &str,
    ids: &[&str],
) -> Result<(DataFrame, Vec<String>), CompareError> {
    let names: Vec<String> = df
        .column(name_column)?
        .str()?
        .iter()
        .map(|v| v.unwrap_or("").to_string())
        .collect();
    let swept: Vec<Vec<(String, String)>> = names
        .iter()
        .map(|n| crate::experiment::matrix::swept_values(n))
        .collect();
    let mut fields: Vec<String> = Vec::new();
    for (f, _) in swept.iter().flatten() {
        if !fields.contains(f) {
            fields.push(f.clone());
        }
    }
    if fields.is_empty() {
        return Ok((df, Vec::new()));
    }
    let existing: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .collect();
    let mut added = Vec::new();
    let mut columns: Vec<Column> = Vec::new();
    for f in &fields {
        let col = if existing.contains(f) {
            format!("{f} (swept)")
        } else {
            f.clone()
        };
        let values: Vec<Option<String>> = swept
            .iter()
            .map(|row| row.iter().find(|(k, _)| k == f).map(|(_, v)| v.clone()))
            .collect();
        columns.push(Column::new(col.as_str().into(), values));
        added.push(col);
    }
    // Order: ids, swept values, the rest.
    let mut order: Vec<String> = ids
        .iter()
        .filter(|c| existing.iter().any(|e| e == *c))
        .map(|c| c.to_string())
        .collect();
    order.extend(added.iter().cloned());
    order.extend(
        existing
            .iter()
            .filter(|c| !ids.contains(&c.as_str()))
            .cloned(),
    );
    let mut df = df;
    for c in columns {
        df.with_column(c)?;
    }
    Ok((df.select(order)?, added))
}

/// Keep the `ids` columns and the chosen metrics; sort by a column
/// (descending for metrics, so the best-scoring rows come first when
/// higher is better).
pub fn select_and_sort(
    df: DataFrame,
    ids: &[&str],
    metrics: &[String],
    sort: Option<&str>,
) -> Result<DataFrame, CompareError> {
    let available: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    let check = |c: &str| -> Result<(), CompareError> {
        if available.iter().any(|a| a == c) {
            return Ok(());
        }
        Err(CompareError::UnknownColumn {
            column: c.to_string(),
            hint: crate::text::did_you_mean(c, available.iter().map(String::as_str)),
            available: available.join(", "),
        })
    };
    let mut df = df;
    if !metrics.is_empty() {
        for m in metrics {
            check(m)?;
        }
        let keep: Vec<String> = ids
            .iter()
            .map(|s| s.to_string())
            .chain(metrics.iter().cloned())
            .collect();
        df = df.select(keep)?;
    }
    if let Some(col) = sort {
        check(col)?;
        let descending = !ids.contains(&col);
        df = df.sort(
            [col],
            SortMultipleOptions::default()
                .with_order_descending(descending)
                .with_nulls_last(true),
        )?;
    }
    Ok(df)
}

/// Settings that differ between stages of the same name in two experiments:
/// (stage, field, value in the first, value in the second).
pub fn changed_settings(root: &Path, a: &str, b: &str) -> Vec<(String, String, String, String)> {
    let ra = RunRecord::read(&super::experiment_dir(root, a));
    let rb = RunRecord::read(&super::experiment_dir(root, b));
    let (Some(ra), Some(rb)) = (ra, rb) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (stage, sa) in &ra.stages {
        let Some(sb) = rb.stages.get(stage) else {
            continue;
        };
        let flat = |v: &serde_json::Value| -> BTreeMap<String, String> {
            let mut leaves = Vec::new();
            crate::plan::reason::flatten("", v, &mut leaves);
            leaves
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect()
        };
        let (fa, fb) = (flat(&sa.identity.settings), flat(&sb.identity.settings));
        let fields: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
        for f in fields {
            let (va, vb) = (fa.get(f), fb.get(f));
            if va != vb {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".into());
                out.push((stage.clone(), f.clone(), show(va), show(vb)));
            }
        }
        if sa.identity.seed != sb.identity.seed {
            out.push((
                stage.clone(),
                "seed".into(),
                sa.identity.seed.to_string(),
                sb.identity.seed.to_string(),
            ));
        }
    }
    out
}

/// Write the table as Parquet or CSV, by extension.
pub fn write_table(df: &mut DataFrame, path: &Path) -> Result<(), CompareError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Ok(write_parquet(df, path)?),
        Some("csv") => {
            let text = to_csv(df)?;
            std::fs::write(path, text).map_err(|e| {
                CompareError::Data(DataError::Io {
                    path: path.to_path_buf(),
                    source: e,
                })
            })
        }
        _ => Err(CompareError::BadOutput(path.display().to_string())),
    }
}

/// RFC 4180 CSV of a table of strings and numbers.
fn to_csv(df: &DataFrame) -> Result<String, PolarsError> {
    let quote = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let names: Vec<String> = df.get_column_names().iter().map(|s| quote(s)).collect();
    let mut out = names.join(",") + "\n";
    for i in 0..df.height() {
        let row: Vec<String> = df
            .columns()
            .iter()
            .map(|c| match c.get(i) {
                Ok(AnyValue::Null) | Err(_) => String::new(),
                Ok(AnyValue::String(s)) => quote(s),
                Ok(v) => quote(&v.to_string()),
            })
            .collect();
        out.push_str(&row.join(","));
        out.push('\n');
    }
    Ok(out)
}
