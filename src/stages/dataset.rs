//! `dataset`: prepare a Parquet dataset for later stages — rename columns,
//! take the train or test side of a split, keep Gopher-filtered dialogues,
//! drop duplicate rows, cap the row count. Writes `data.parquet`.
//!
//! ```toml
//! [stages.forum]
//! kind = "dataset"
//! input = { stage = "world", file = "corpus.parquet" }   # or a path
//! dialogue_filter = true
//! dedup = true
//! max_rows = 1000
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{DataInput, Input, Metrics, StageContext, StageError, StageKind};
use crate::data::{prepare, read_parquet, write_parquet};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSettings {
    /// The Parquet file (or stage output) to read. Required.
    pub input: DataInput,
    /// Renames, as `wanted = "name in the file"`. Default: none.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// Keep only this side of the split: "train" or "test". Default: no split.
    #[serde(default)]
    pub split: Option<Split>,
    /// Column whose values ("train"/"test") give the split; when unset the
    /// split is a seeded random `test_fraction` of rows.
    #[serde(default)]
    pub split_column: Option<String>,
    /// Share of rows in the test split (when no `split_column`). Default 0.1.
    #[serde(default = "default_test_fraction")]
    pub test_fraction: f64,
    /// Keep only texts that pass the dialogue filter. Default false.
    #[serde(default)]
    pub dialogue_filter: bool,
    /// Minimum number of turns for the dialogue filter. Default 2.
    #[serde(default = "default_min_turns")]
    pub min_turns: usize,
    /// Column the dialogue filter reads. Default "text".
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Drop rows identical to an earlier row. Default false.
    #[serde(default)]
    pub dedup: bool,
    /// Keep at most this many rows (after the other steps). Default: all.
    #[serde(default)]
    pub max_rows: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

fn default_test_fraction() -> f64 {
    0.1
}
fn default_min_turns() -> usize {
    2
}
fn default_text_column() -> String {
    "text".into()
}

impl StageKind for DatasetSettings {
    const KIND: &'static str = "dataset";
    const RECIPE_VERSION: u32 = 1;
    const SUMMARY: &'static str = "rename, split, filter, dedup and cap a Parquet dataset";

    fn inputs(&self) -> Vec<Input> {
        vec![Input::data("input", &self.input)]
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if !(0.0..=1.0).contains(&self.test_fraction) {
            return Err((
                "test_fraction".into(),
                format!("must be between 0 and 1, got {}", self.test_fraction),
            ));
        }
        Ok(())
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec!["data.parquet".into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let path = ctx.input_path(&self.input)?;
        let mut df = read_parquet(&path)?;
        let rows_in = df.height();
        prepare::rename_columns(&mut df, &self.columns, &path)?;

        if let Some(split) = self.split {
            let in_test: Vec<bool> = match &self.split_column {
                Some(col) => {
                    let values = df
                        .column(col)
                        .map_err(|_| prepare::missing_column(&df, col, &path))?
                        .str()
                        .map_err(|_| {
                            StageError::Failed(format!(
                                "{}: split column `{col}` is not text",
                                path.display()
                            ))
                        })?
                        .iter()
                        .map(|v| v == Some("test"))
                        .collect();
                    values
                }
                None => prepare::test_mask(df.height(), self.test_fraction, ctx.seed),
            };
            let keep = in_test
                .into_iter()
                .map(|t| t == (split == Split::Test))
                .collect();
            df = prepare::filter(&df, keep)?;
        }
        if self.dialogue_filter {
            let texts = df
                .column(&self.text_column)
                .map_err(|_| prepare::missing_column(&df, &self.text_column, &path))?
                .str()
                .map_err(|_| {
                    StageError::Failed(format!(
                        "{}: column `{}` is not text",
                        path.display(),
                        self.text_column
                    ))
                })?
                .iter()
                .map(|t| t.is_some_and(|t| prepare::is_good_dialogue(t, self.min_turns)))
                .collect();
            df = prepare::filter(&df, texts)?;
        }
        if self.dedup {
            let keep = prepare::first_occurrences(&df);
            df = prepare::filter(&df, keep)?;
        }
        if let Some(max) = self.max_rows {
            df = df.head(Some(max));
        }
        write_parquet(&mut df, &ctx.out("data.parquet"))?;
        let mut metrics = Metrics::new();
        metrics.insert("rows_in".into(), rows_in as f64);
        metrics.insert("rows_out".into(), df.height() as f64);
        Ok(metrics)
    }
}
