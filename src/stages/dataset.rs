//! `dataset`: read a Parquet dataset (a file, a folder of files, or an
//! upstream stage's file), apply its selection steps — rename columns, take
//! a split, keep Gopher-filtered dialogues, drop duplicates, cap the rows —
//! check its rows in their format (declared with `format = "..."` or
//! detected from the columns), and write `data.parquet` for later stages.
//!
//! ```toml
//! [stages.dialogues]
//! kind = "dataset"
//! input = { stage = "world", file = "corpus.parquet", dialogue_filter = true, dedup = true }
//! ```

use serde::{Deserialize, Serialize};

use super::{DataSource, Input, Metrics, StageContext, StageError, StageKind};
use crate::data::formats::{self, Format};
use crate::data::{read_parquet_path, write_parquet};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSettings {
    /// The data and its selection steps (see `data::source`). Required.
    #[serde(deserialize_with = "DataSource::from_str_or_table")]
    pub input: DataSource,
}

impl StageKind for DatasetSettings {
    const KIND: &'static str = "dataset";
    const RECIPE_VERSION: u32 = 1;
    const SUMMARY: &'static str = "rename, split, filter, dedup and cap a Parquet dataset";

    fn inputs(&self) -> Vec<Input> {
        vec![Input::data("input", &self.input)]
    }

    fn outputs(&self) -> Option<Vec<String>> {
        Some(vec!["data.parquet".into()])
    }

    fn run(&self, ctx: &StageContext) -> Result<Metrics, StageError> {
        let path = ctx.input_path(&self.input)?;
        let raw = read_parquet_path(&path)?;
        let rows_in = raw.height();
        let mut df = self.input.apply(raw, &path, ctx.seed)?;
        // Bad rows stop here, not in a later training stage.
        if let Some(format) = self.input.format.or_else(|| Format::detect(&df)) {
            formats::validate(&df, &path, format)?;
        }
        write_parquet(&mut df, &ctx.out("data.parquet"))?;
        let mut metrics = Metrics::new();
        metrics.insert("rows_in".into(), rows_in as f64);
        metrics.insert("rows_out".into(), df.height() as f64);
        Ok(metrics)
    }
}
