//! The per-step metrics log of a training stage, written as Parquet while
//! training runs: rows are buffered and flushed as a row group every
//! `flush_every` rows, so a long run's log can be read before it ends.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use polars::io::parquet::write::BatchedWriter;
use polars::prelude::*;

use crate::data::DataError;

pub struct MetricsLog {
    path: PathBuf,
    writer: Option<BatchedWriter<File>>,
    columns: Vec<String>,
    rows: Vec<BTreeMap<String, f64>>,
    /// Every row logged so far (a resumed stage's checkpoint holds them).
    history: Vec<BTreeMap<String, f64>>,
    flush_every: usize,
    /// The last value of every metric, for the stage's final metrics.
    pub last: BTreeMap<String, f64>,
}

impl MetricsLog {
    /// A log at `path` whose rows have exactly `columns` (besides `step`).
    pub fn create(path: &Path, columns: &[&str], flush_every: usize) -> MetricsLog {
        MetricsLog {
            path: path.to_path_buf(),
            writer: None,
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            history: Vec::new(),
            flush_every: flush_every.max(1),
            last: BTreeMap::new(),
        }
    }

    /// Record one row; metrics not given are null.
    pub fn log(&mut self, step: usize, values: &[(&str, f64)]) -> Result<(), DataError> {
        let mut row: BTreeMap<String, f64> =
            values.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        for (k, v) in &row {
            self.last.insert(k.clone(), *v);
        }
        row.insert("step".into(), step as f64);
        self.history.push(row.clone());
        self.rows.push(row);
        if self.rows.len() >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Every row logged so far, `step` included.
    pub fn history(&self) -> &[BTreeMap<String, f64>] {
        &self.history
    }

    /// Log saved rows again (a resumed stage): the file and the final
    /// metrics come out as if they had been logged in this process.
    pub fn replay(&mut self, rows: &[BTreeMap<String, f64>]) -> Result<(), DataError> {
        for row in rows {
            let step = row.get("step").copied().unwrap_or(0.0) as usize;
            let values: Vec<(&str, f64)> = row
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .map(|(k, v)| (k.as_str(), *v))
                .collect();
            self.log(step, &values)?;
        }
        Ok(())
    }

    fn frame(&self) -> Result<DataFrame, DataError> {
        let mut cols = vec![Column::new(
            "step".into(),
            self.rows
                .iter()
                .map(|r| r["step"] as i64)
                .collect::<Vec<_>>(),
        )];
        for c in &self.columns {
            cols.push(Column::new(
                c.as_str().into(),
                self.rows
                    .iter()
                    .map(|r| r.get(c).copied())
                    .collect::<Vec<Option<f64>>>(),
            ));
        }
        Ok(DataFrame::new_infer_height(cols)?)
    }

    /// Write buffered rows as a row group.
    pub fn flush(&mut self) -> Result<(), DataError> {
        if self.rows.is_empty() && self.writer.is_some() {
            return Ok(());
        }
        let df = self.frame()?;
        if self.writer.is_none() {
            let file = File::create(&self.path).map_err(DataError::io(&self.path))?;
            self.writer = Some(ParquetWriter::new(file).batched(df.schema())?);
        }
        self.writer.as_mut().expect("created").write_batch(&df)?;
        self.rows.clear();
        Ok(())
    }

    /// Flush and close the file.
    pub fn finish(mut self) -> Result<BTreeMap<String, f64>, DataError> {
        self.flush()?;
        if let Some(w) = &self.writer {
            w.finish()?;
        }
        Ok(self.last)
    }
}
