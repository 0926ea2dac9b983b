//! Where a stage's data comes from and how it is narrowed. Every data field
//! of every stage is a [`DataSource`]: a path string, or a table naming a
//! path or an upstream stage's file plus optional selection steps:
//!
//! ```toml
//! corpus = "datasets/assistant/corpus.parquet"
//! train = { stage = "world", file = "demonstrations.parquet", max_rows = 1000 }
//! pairs = { path = "datasets/hh.parquet", columns = { prompt = "question" }, split = "train" }
//! ```
//!
//! Steps run in this order: rename `columns`, `split`, `dialogue_filter`,
//! `dedup`, `max_rows`.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::*;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::formats::Format;
use super::{prepare, read_parquet_path, DataError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSource {
    /// A Parquet file, or a folder of them, relative to the project root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// An upstream stage whose output holds `file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The file's format when the columns do not make it clear (detected by default).
    pub format: Option<Format>,
    /// Renames, `wanted = "name in the file"`. Default: none.
    pub columns: BTreeMap<String, String>,
    /// Keep only this side of a split. Default: all rows.
    pub split: Option<Split>,
    /// Column with "train"/"test" values; else a seeded random split.
    pub split_column: Option<String>,
    /// Share of test rows for the random split. Default 0.1.
    pub test_fraction: f64,
    /// Keep only Gopher-style "[A]: ... [B]: ..." dialogues. Default false.
    pub dialogue_filter: bool,
    /// Minimum turns for the dialogue filter. Default 2.
    pub min_turns: usize,
    /// The text column the dialogue filter reads. Default "text".
    pub text_column: String,
    /// Drop rows equal to an earlier row. Default false.
    pub dedup: bool,
    /// Keep at most this many rows. Default: all.
    pub max_rows: Option<usize>,
}

impl Default for DataSource {
    fn default() -> Self {
        DataSource {
            path: None,
            stage: None,
            file: None,
            format: None,
            columns: BTreeMap::new(),
            split: None,
            split_column: None,
            test_fraction: 0.1,
            dialogue_filter: false,
            min_turns: 2,
            text_column: "text".into(),
            dedup: false,
            max_rows: None,
        }
    }
}

impl DataSource {
    /// A plain path with no selection steps.
    pub fn path(p: &str) -> DataSource {
        DataSource {
            path: Some(p.to_string()),
            ..DataSource::default()
        }
    }

    /// `deserialize_with` for stage fields: a path string or a table.
    pub fn from_str_or_table<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DataSource, D::Error> {
        struct SourceVisitor;
        impl<'de> Visitor<'de> for SourceVisitor {
            type Value = DataSource;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path string, or a table with `path`, or `stage` and `file`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DataSource, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                Ok(DataSource::path(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DataSource, A::Error> {
                let source = DataSource::deserialize(de::value::MapAccessDeserializer::new(map))?;
                match (&source.path, &source.stage, &source.file) {
                    (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                    (None, Some(_), None) => return Err(de::Error::missing_field("file")),
                    _ => {
                        return Err(de::Error::custom(
                            "a data source needs `path = \"...\"`, or `stage = \"...\"` with `file = \"...\"` (not both)",
                        ))
                    }
                }
                if source.max_rows == Some(0) {
                    return Err(de::Error::custom(
                        "`max_rows` must be at least 1 (leave it out to read every row)",
                    ));
                }
                if !(0.0..=1.0).contains(&source.test_fraction) {
                    return Err(de::Error::custom(format!(
                        "`test_fraction` must be between 0 and 1, got {}",
                        source.test_fraction
                    )));
                }
                Ok(source)
            }
        }
        deserializer.deserialize_any(SourceVisitor)
    }

    /// `deserialize_with` for optional data fields (use with `default`).
    pub fn optional<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DataSource>, D::Error> {
        DataSource::from_str_or_table(deserializer).map(Some)
    }

    /// Read the data at `path` (already resolved) and apply the steps.
    pub fn load(&self, path: &Path, seed: u64) -> Result<DataFrame, DataError> {
        let df = read_parquet_path(path)?;
        self.apply(df, path, seed)
    }

    /// Apply the selection steps to a frame read from `path`.
    pub fn apply(&self, mut df: DataFrame, path: &Path, seed: u64) -> Result<DataFrame, DataError> {
        prepare::rename_columns(&mut df, &self.columns, path)?;
        if let Some(split) = self.split {
            let in_test: Vec<bool> = match &self.split_column {
                Some(col) => super::formats::text_column(&df, col, path)?
                    .into_iter()
                    .map(|v| v.as_deref() == Some("test"))
                    .collect(),
                None => prepare::test_mask(df.height(), self.test_fraction, seed),
            };
            let keep = in_test
                .into_iter()
                .map(|t| t == (split == Split::Test))
                .collect();
            let rows = df.height();
            df = prepare::filter(&df, keep)?;
            if df.height() == 0 {
                let side = if split == Split::Test {
                    "test"
                } else {
                    "train"
                };
                let how = match &self.split_column {
                    Some(c) => format!("no row has `{c}` = \"{side}\""),
                    None => format!("test_fraction = {}", self.test_fraction),
                };
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "split = \"{side}\" keeps none of its {rows} rows ({how}): use more rows, or change the split"
                    ),
                });
            }
        }
        if self.dialogue_filter {
            let keep = super::formats::text_column(&df, &self.text_column, path)?
                .iter()
                .map(|t| {
                    t.as_deref()
                        .is_some_and(|t| prepare::is_good_dialogue(t, self.min_turns))
                })
                .collect();
            df = prepare::filter(&df, keep)?;
        }
        if self.dedup {
            let keep = prepare::first_occurrences(&df);
            df = prepare::filter(&df, keep)?;
        }
        if let Some(max) = self.max_rows {
            df = df.head(Some(max));
        }
        Ok(df)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        #[serde(deserialize_with = "DataSource::from_str_or_table")]
        data: DataSource,
    }

    fn parse(text: &str) -> Result<DataSource, String> {
        toml::from_str::<Holder>(text)
            .map(|h| h.data)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn reads_paths_stage_files_and_options() {
        assert_eq!(
            parse("data = \"d.parquet\"").unwrap(),
            DataSource::path("d.parquet")
        );
        let s = parse("data = { stage = \"w\", file = \"c.parquet\", max_rows = 5, columns = { prompt = \"q\" } }").unwrap();
        assert_eq!(s.stage.as_deref(), Some("w"));
        assert_eq!(s.max_rows, Some(5));
        assert_eq!(s.columns["prompt"], "q");
    }

    #[test]
    fn refuses_unknown_options_and_half_locations() {
        assert!(parse("data = { path = \"d\", max_row = 5 }")
            .unwrap_err()
            .contains("unknown field `max_row`"));
        assert!(parse("data = { stage = \"w\" }")
            .unwrap_err()
            .contains("missing field `file`"));
        assert!(
            parse("data = { path = \"d\", stage = \"w\", file = \"f\" }")
                .unwrap_err()
                .contains("not both")
        );
        assert!(parse("data = { path = \"d\", test_fraction = 2.0 }")
            .unwrap_err()
            .contains("between 0 and 1"));
    }
}
