//! Datasets: Parquet reading and writing with polars, and the synthetic
//! assistant world (facts, requests, failure modes, gold labeler).

pub mod corpus;
pub mod formats;
pub mod gold;
pub mod prepare;
pub mod ratings;
pub mod rng;
pub mod source;
pub mod synth;
pub mod tokenize;
pub mod verifiers;
pub mod world;

use std::path::{Path, PathBuf};

use polars::prelude::*;

/// Why a dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a readable Parquet file: {message}", path.display())]
    NotParquet { path: PathBuf, message: String },
    #[error(transparent)]
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

/// Read a Parquet file, or every `*.parquet` file of a folder (sorted by
/// name, walked recursively) stacked into one frame.
pub fn read_parquet_path(path: &Path) -> Result<DataFrame, DataError> {
    if !path.is_dir() {
        return read_parquet(path);
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(path)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "parquet"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let mut frames = files.iter().map(|f| read_parquet(f));
    let Some(first) = frames.next() else {
        return Err(DataError::Invalid {
            path: path.to_path_buf(),
            message: "the folder holds no .parquet files".into(),
        });
    };
    let mut df = first?;
    for (next, file) in frames.zip(files.iter().skip(1)) {
        df.vstack_mut(&next?).map_err(|e| DataError::Invalid {
            path: file.clone(),
            message: format!("columns differ from {}: {e}", files[0].display()),
        })?;
    }
    Ok(df)
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
