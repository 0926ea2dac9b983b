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
    #[error(transparent)]
    NoExperiment(#[from] crate::experiment::ExperimentError),
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

/// An experiment without results: not run yet, or no such experiment (a
/// typo: the error suggests the closest name).
fn no_results(root: &Path, exp: &str) -> CompareError {
    match crate::experiment::find(root, exp) {
        Ok(_) => CompareError::NoResults(exp.to_string()),
        Err(e) => CompareError::NoExperiment(e),
    }
}

/// Id columns, duration and metrics of one stage row.
type CompareRow = (BTreeMap<&'static str, String>, f64, BTreeMap<String, f64>);

/// One wide table of the experiments' runs.
pub fn compare_table(root: &Path, experiments: &[String]) -> Result<DataFrame, CompareError> {
    let mut rows: Vec<CompareRow> = Vec::new();
    let mut frames = Vec::new();
    for exp in experiments {
        let dir = super::experiment_dir(root, exp);
        let df = read_runs(&dir).map_err(|_| no_results(root, exp))?;
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
            return Err(no_results(root, exp));
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
        // A metric that is also an id column (`duration_s`, `status`) is
        // shown once, where the id columns are.
        let mut keep: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        for m in metrics {
            if !keep.contains(m) {
                keep.push(m.clone());
            }
        }
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

/// The metric columns of a runs comparison that fit in `width`
/// characters beside the id columns: those most rows have first; returns
/// them and how many were left out.
pub fn fitting_metrics(df: &DataFrame, ids: &[&str], width: usize) -> (Vec<String>, usize) {
    let mut candidates: Vec<(usize, String, usize)> = df
        .columns()
        .iter()
        .filter(|c| !ids.contains(&c.name().as_str()))
        .map(|c| {
            let filled = c.len() - c.null_count();
            // Values print as short numbers; the name sets the width.
            let cell = c.name().len().max(8) + 2;
            (filled, c.name().to_string(), cell)
        })
        .filter(|(filled, _, _)| *filled > 0)
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let id_width: usize = ids
        .iter()
        .map(|id| {
            let values = df
                .column(id)
                .ok()
                .and_then(|c| {
                    c.str()
                        .ok()
                        .map(|s| s.iter().map(|v| v.map_or(0, str::len)).max().unwrap_or(0))
                })
                .unwrap_or(8);
            id.len().max(values) + 2
        })
        .sum();
    let mut used = id_width;
    let mut shown = Vec::new();
    for (_, name, cell) in &candidates {
        if used + cell > width && !shown.is_empty() {
            break;
        }
        used += cell;
        shown.push(name.clone());
    }
    let left = candidates.len() - shown.len();
    (shown, left)
}

/// Settings that differ between the matching stages of two experiments:
/// (stage, field, value in the first, value in the second). Stages match
/// by name, else by kind and upstream (the same place in the DAG: `b01`
/// reading `sft` matches `dpo` reading `sft`); the stage column shows both
/// names when they differ. A field one side leaves out is one row.
pub fn changed_settings(root: &Path, a: &str, b: &str) -> Vec<(String, String, String, String)> {
    let ra = RunRecord::read(&super::experiment_dir(root, a));
    let rb = RunRecord::read(&super::experiment_dir(root, b));
    let (Some(ra), Some(rb)) = (ra, rb) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name_a, name_b) in matching_stages(&ra, &rb) {
        let (sa, sb) = (&ra.stages[&name_a], &rb.stages[&name_b]);
        let stage = if name_a == name_b {
            name_a.clone()
        } else {
            format!("{name_a} ~ {name_b}")
        };
        if sa.identity.key == sb.identity.key {
            continue;
        }
        for (f, va, vb) in differing_fields(&sa.identity.settings, &sb.identity.settings) {
            out.push((stage.clone(), f, va, vb));
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

/// Pairs (stage of `a`, stage of `b`) that are the same stage: same name
/// and kind; then, repeatedly, same kind with every upstream field naming
/// stages already paired (or the same key); then the only stage of a kind
/// left on each side.
fn matching_stages(a: &RunRecord, b: &RunRecord) -> Vec<(String, String)> {
    let mut pairs: BTreeMap<String, String> = BTreeMap::new();
    for (name, s) in &a.stages {
        if b.stages
            .get(name)
            .is_some_and(|t| t.identity.kind == s.identity.kind)
        {
            pairs.insert(name.clone(), name.clone());
        }
    }
    let upstream = |r: &RunRecord, name: &str| -> BTreeMap<String, (String, String)> {
        r.stages[name]
            .identity
            .upstream
            .iter()
            .map(|u| (u.field.clone(), (u.stage.clone(), u.key.clone())))
            .collect()
    };
    loop {
        let taken: BTreeSet<String> = pairs.values().cloned().collect();
        let mut added = false;
        for (name, s) in &a.stages {
            if pairs.contains_key(name) {
                continue;
            }
            let ups_a = upstream(a, name);
            let candidates: Vec<&String> = b
                .stages
                .iter()
                .filter(|(n, t)| !taken.contains(*n) && t.identity.kind == s.identity.kind)
                .map(|(n, _)| n)
                .collect();
            let same_place: Vec<&String> = candidates
                .iter()
                .copied()
                .filter(|n| {
                    let ups_b = upstream(b, n);
                    ups_a.len() == ups_b.len()
                        && ups_a.iter().all(|(field, (sa, ka))| {
                            ups_b.get(field).is_some_and(|(sb, kb)| {
                                ka == kb || pairs.get(sa).is_some_and(|p| p == sb)
                            })
                        })
                })
                .collect();
            let pick = match (same_place.as_slice(), candidates.as_slice()) {
                ([one], _) | ([], [one]) => Some((*one).clone()),
                _ => None,
            };
            if let Some(p) = pick {
                pairs.insert(name.clone(), p);
                added = true;
                break;
            }
        }
        if !added {
            break;
        }
    }
    pairs.into_iter().collect()
}

/// (field, value in a, value in b) for each setting that differs; a field
/// set on one side only is one row (its value in short), not one per leaf.
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value) -> Vec<(String, String, String)> {
    let empty = serde_json::Map::new();
    let (ma, mb) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let short = |v: &serde_json::Value| -> String {
        let text = match v {
            serde_json::Value::Object(m) => {
                // A data source: where it reads is what tells them apart.
                let place: Vec<String> = ["path", "stage", "file"]
                    .iter()
                    .filter_map(|k| {
                        m.get(*k)
                            .and_then(|x| x.as_str())
                            .map(|x| format!("{k} = {x}"))
                    })
                    .collect();
                if place.is_empty() {
                    v.to_string()
                } else {
                    format!("{{ {} }}", place.join(", "))
                }
            }
            other => other.to_string(),
        };
        if text.chars().count() > 60 {
            format!("{}...", text.chars().take(57).collect::<String>())
        } else {
            text
        }
    };
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    for k in keys {
        match (ma.get(k), mb.get(k)) {
            (Some(va), Some(vb)) => {
                let mut la = Vec::new();
                let mut lb = Vec::new();
                crate::plan::reason::flatten(k, va, &mut la);
                crate::plan::reason::flatten(k, vb, &mut lb);
                let fa: BTreeMap<String, String> =
                    la.into_iter().map(|(f, v)| (f, v.to_string())).collect();
                let fb: BTreeMap<String, String> =
                    lb.into_iter().map(|(f, v)| (f, v.to_string())).collect();
                let fields: BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
                for f in fields {
                    let (x, y) = (fa.get(f), fb.get(f));
                    if x != y {
                        let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "-".into());
                        out.push((f.clone(), show(x), show(y)));
                    }
                }
            }
            (Some(va), None) => out.push((k.clone(), short(va), "-".into())),
            (None, Some(vb)) => out.push((k.clone(), "-".into(), short(vb))),
            (None, None) => {}
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::plan::{StageIdentity, UpstreamInput};
    use crate::results::record::StageRecord;
    use serde_json::json;

    fn stage(
        key: &str,
        kind: &str,
        settings: serde_json::Value,
        up: &[(&str, &str, &str)],
    ) -> StageRecord {
        StageRecord {
            identity: StageIdentity {
                key: key.into(),
                kind: kind.into(),
                recipe_version: 1,
                seed: 0,
                settings,
                upstream: up
                    .iter()
                    .map(|(f, s, k)| UpstreamInput {
                        field: f.to_string(),
                        stage: s.to_string(),
                        key: k.to_string(),
                    })
                    .collect(),
                datasets: Vec::new(),
            },
            status: "ran".into(),
            duration_s: 1.0,
            metrics: Default::default(),
            store_path: PathBuf::new(),
        }
    }

    fn record(name: &str, stages: Vec<(&str, StageRecord)>) -> RunRecord {
        RunRecord {
            experiment: name.into(),
            file: PathBuf::new(),
            finished: String::new(),
            stages: stages
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect(),
        }
    }

    #[test]
    fn settings_that_differ_match_stages_by_place_and_keep_an_unset_source_to_one_row() {
        let dir = tempfile::tempdir().unwrap();
        let data = json!({"stage": "world", "file": "comparisons_test.parquet", "test_fraction": 0.1,
            "dialogue_filter": false, "min_turns": 2, "text_column": "text", "dedup": false,
            "columns": {}, "format": null, "split": null, "split_column": null, "max_rows": null});
        let a = record(
            "llama-dpo",
            vec![
                ("sft", stage("k-sft", "sft", json!({"lr": 1.0}), &[])),
                (
                    "dpo",
                    stage(
                        "k-dpo",
                        "dpo",
                        json!({"beta": 0.1, "eval_data": data}),
                        &[("from", "sft", "k-sft")],
                    ),
                ),
            ],
        );
        let b = record(
            "my-beta",
            vec![
                ("sft", stage("k-sft", "sft", json!({"lr": 1.0}), &[])),
                (
                    "b01",
                    stage(
                        "k-b01",
                        "dpo",
                        json!({"beta": 0.01}),
                        &[("from", "sft", "k-sft")],
                    ),
                ),
            ],
        );
        a.write(&dir.path().join("results/llama-dpo")).unwrap();
        b.write(&dir.path().join("results/my-beta")).unwrap();
        let changed = changed_settings(dir.path(), "llama-dpo", "my-beta");
        assert_eq!(
            changed,
            vec![
                (
                    "dpo ~ b01".to_string(),
                    "beta".to_string(),
                    "0.1".to_string(),
                    "0.01".to_string()
                ),
                (
                    "dpo ~ b01".to_string(),
                    "eval_data".to_string(),
                    "{ stage = world, file = comparisons_test.parquet }".to_string(),
                    "-".to_string()
                ),
            ]
        );
    }
}
