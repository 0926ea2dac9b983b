//! Dataset files checked when the plan is made, before any stage runs:
//! each Parquet file a stage reads from the project (not an upstream
//! stage's output, which does not exist yet) has the columns and types its
//! field needs and at least one row, and a split keeps at least one row.
//! Only the Parquet footer is read (schema and row count), so this takes
//! milliseconds however large the file; the rows themselves are still
//! checked when the stage reads them.

use std::path::Path;

use polars::prelude::*;

use crate::data::formats::{self, Format};
use crate::data::source::{DataSource, Split};
use crate::experiment::Experiment;
use crate::stages::InputTarget;

/// A dataset that would make its stage fail.
#[derive(Debug, Clone, PartialEq)]
pub struct DataProblem {
    pub stage: String,
    pub field: String,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for DataProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stage `{}`, `{}`: {}",
            self.stage, self.field, self.message
        )
    }
}

/// What a data field of a stage kind is read as.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Corpus,
    Demonstrations,
    Comparisons,
    /// Comparisons, or KTO's unpaired rows.
    Labeled,
    Prompts,
    Ratings,
    /// Any known format (the `dataset` kind).
    Any,
}

fn role(kind: &str, field: &str) -> Option<Role> {
    Some(match (kind, field) {
        (_, "corpus" | "ptx_data") => Role::Corpus,
        (_, "prompts" | "normalize.prompts") => Role::Prompts,
        ("kto", "ratings") => Role::Ratings,
        ("kto", "data") => Role::Labeled,
        ("sft", "data" | "eval_data") | ("eval", "demonstrations") => Role::Demonstrations,
        ("dpo" | "reward" | "orpo" | "simpo" | "kto", "data" | "eval_data")
        | ("eval", "comparisons")
        | ("label", "extra")
        | ("rate", "data") => Role::Comparisons,
        ("dataset", "input") => Role::Any,
        _ => return None,
    })
}

/// Every problem with the dataset files of `exp` (paths relative to `root`).
pub fn check(exp: &Experiment, root: &Path) -> Vec<DataProblem> {
    let mut problems = Vec::new();
    for (name, stage) in &exp.stages {
        let settings = stage.settings.to_json();
        for input in stage.settings.inputs() {
            let InputTarget::Path(rel) = &input.target else {
                continue;
            };
            let pointer = format!("/{}", input.field.replace('.', "/"));
            let Some(source) = settings
                .pointer(&pointer)
                .and_then(|v| serde_json::from_value::<DataSource>(v.clone()).ok())
            else {
                continue; // not a data source (a chat template file)
            };
            let kind = stage.settings.kind();
            if let Err(message) = check_file(
                &root.join(rel),
                &source,
                role(kind, &input.field),
                stage.seed,
            ) {
                problems.push(DataProblem {
                    stage: name.clone(),
                    field: input.field.clone(),
                    path: rel.clone(),
                    message,
                });
            }
        }
    }
    problems
}

/// The Parquet files of a path: itself, or a folder's `*.parquet` files.
fn parquet_files(path: &Path) -> Vec<std::path::PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<_> = walkdir::WalkDir::new(path)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "parquet"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

fn check_file(
    path: &Path,
    source: &DataSource,
    role: Option<Role>,
    seed: u64,
) -> Result<(), String> {
    let files = parquet_files(path);
    let Some(first) = files.first() else {
        return Err(format!(
            "{}: the folder holds no .parquet files",
            path.display()
        ));
    };
    let mut rows = 0;
    let mut schema = None;
    for f in &files {
        let file =
            std::fs::File::open(f).map_err(|e| format!("cannot open {}: {e}", f.display()))?;
        let mut reader = ParquetReader::new(file);
        let bad = |e: PolarsError| format!("{}: not a readable Parquet file: {e}", f.display());
        rows += reader.num_rows().map_err(bad)?;
        if schema.is_none() {
            let arrow = reader.schema().map_err(bad)?;
            schema = Some(Schema::from_arrow_schema(&arrow));
        }
    }
    let schema = schema.expect("one file at least");
    if rows == 0 {
        return Err(format!(
            "{}: the data set has no rows; a stage needs at least one",
            path.display()
        ));
    }
    // An empty frame with the file's columns runs every column and type
    // check of the format readers without reading a row.
    let mut df = DataFrame::empty_with_schema(&schema);
    crate::data::prepare::rename_columns(&mut df, &source.columns, first)
        .map_err(|e| e.to_string())?;
    if let (Some(split), None) = (source.split, &source.split_column) {
        let test = crate::data::prepare::test_mask(rows, source.test_fraction, seed)
            .into_iter()
            .filter(|t| *t)
            .count();
        let kept = if split == Split::Test {
            test
        } else {
            rows - test
        };
        if kept == 0 {
            return Err(format!(
                "{}: split = \"{}\" keeps none of its {rows} rows (test_fraction = {}): use more rows, or another test_fraction",
                path.display(),
                if split == Split::Test { "test" } else { "train" },
                source.test_fraction
            ));
        }
    }
    let check = |r: Result<(), crate::data::DataError>| r.map_err(|e| e.to_string());
    match role {
        None => Ok(()),
        Some(Role::Corpus) => check(formats::load_corpus(&df, first).map(drop)),
        Some(Role::Demonstrations) => {
            check(formats::load_demonstrations(&df, first, source.format).map(drop))
        }
        Some(Role::Comparisons) => {
            check(formats::load_comparisons(&df, first, source.format).map(drop))
        }
        Some(Role::Labeled) => {
            if source.format.or_else(|| Format::detect(&df)) == Some(Format::Unpaired) {
                check(formats::load_unpaired(&df, first).map(drop))
            } else {
                check(formats::load_comparisons(&df, first, source.format).map(drop))
            }
        }
        Some(Role::Prompts) => check(formats::load_prompts(&df, first).map(drop)),
        Some(Role::Ratings) => check(crate::data::ratings::read(&df, first).map(drop)),
        Some(Role::Any) => match source.format.or_else(|| Format::detect(&df)) {
            Some(f) => check(formats::validate(&df, first, f)),
            None => Ok(()),
        },
    }
}
