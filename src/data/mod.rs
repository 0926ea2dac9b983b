//! Datasets: Parquet reading and writing with polars, and the synthetic
//! assistant world (facts, requests, failure modes, gold labeler).

pub mod chat;
pub mod corpus;
pub mod gold;
pub mod prepare;
pub mod rng;
pub mod synth;
pub mod world;

use std::path::{Path, PathBuf};

use polars::prelude::*;

/// Why a dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable Parquet file: {message}", path.display())]
    NotParquet { path: PathBuf, message: String },
    #[error("{0}")]
    Polars(#[from] PolarsError),
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl DataError {
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
        move |source| DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Write `df` as Parquet at `path`.
pub fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<(), DataError> {
    let file = std::fs::File::create(path).map_err(DataError::io(path))?;
    ParquetWriter::new(file)
        .finish(df)
        .map_err(|e| DataError::Invalid {
            path: path.to_path_buf(),
            message: format!("cannot write Parquet: {e}"),
        })?;
    Ok(())
}

/// Read a whole Parquet file.
pub fn read_parquet(path: &Path) -> Result<DataFrame, DataError> {
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    ParquetReader::new(file)
        .finish()
        .map_err(|e| DataError::NotParquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}
