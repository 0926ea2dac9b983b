//! What a running stage gets from the runner, and how it fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use indicatif::ProgressBar;

use super::inputs::{DataSource, StageRef};

/// Final metrics a stage reports (name -> value), stored in its manifest
/// and in `runs.parquet`.
pub type Metrics = BTreeMap<String, f64>;

/// A stage's view of the world while it runs.
pub struct StageContext<'a> {
    /// The stage's name in this experiment (for messages only: not in the key).
    pub stage: &'a str,
    /// Project root: dataset paths are relative to it.
    pub root: &'a Path,
    /// Temporary folder that becomes the store entry if the stage succeeds.
    pub out_dir: &'a Path,
    /// The stage's seed (the experiment's unless the stage sets its own).
    pub seed: u64,
    /// Caches shared by all stages (`STORE/.cache`): tokenized datasets.
    pub cache_dir: &'a Path,
    /// Store entry folder of every upstream stage, by stage name.
    pub upstream: &'a BTreeMap<String, PathBuf>,
    /// Progress display for the stage's long steps (hidden when not a TTY).
    pub progress: &'a ProgressBar,
    /// Where a training stage keeps its resume snapshots (`STORE/.resume/<key>`;
    /// not in the key, never published). `None`: no snapshots.
    pub resume_dir: Option<&'a Path>,
}

impl StageContext<'_> {
    /// The store entry of an upstream stage.
    pub fn stage_dir(&self, r: &StageRef) -> Result<&Path, StageError> {
        self.upstream
            .get(r.name())
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                StageError::Failed(format!("upstream stage `{}` has no output", r.name()))
            })
    }

    /// The file or folder a data source points to.
    pub fn input_path(&self, source: &DataSource) -> Result<PathBuf, StageError> {
        match (&source.path, &source.stage, &source.file) {
            (_, Some(stage), Some(file)) => {
                let path = self.stage_dir(&StageRef(stage.clone()))?.join(file);
                if !path.exists() {
                    return Err(StageError::Failed(format!(
                        "stage `{stage}` wrote no file `{file}`"
                    )));
                }
                Ok(path)
            }
            (Some(p), _, _) => Ok(self.root.join(p)),
            _ => Err(StageError::Failed(
                "a data source has neither a path nor a stage file".into(),
            )),
        }
    }

    /// Read a data source and apply its selection steps.
    pub fn load(
        &self,
        source: &DataSource,
    ) -> Result<(polars::prelude::DataFrame, PathBuf), StageError> {
        let path = self.input_path(source)?;
        let df = source.load(&path, self.seed)?;
        if df.height() == 0 {
            let selected = source.split.is_some() || source.dialogue_filter || source.dedup;
            return Err(StageError::Failed(format!(
                "{}: the data set has no rows{}; a stage needs at least one",
                path.display(),
                if selected {
                    " left after its selection (split, dialogue_filter, dedup)"
                } else {
                    ""
                }
            )));
        }
        Ok((df, path))
    }

    /// Resume snapshots for a training loop (see `train::resume`).
    pub fn checkpoints(&self) -> crate::train::resume::Checkpoints {
        crate::train::resume::Checkpoints::new(self.resume_dir)
    }

    /// A path inside the stage's output folder.
    pub fn out(&self, file: &str) -> PathBuf {
        self.out_dir.join(file)
    }
}

/// Why a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error(transparent)]
    Train(#[from] crate::train::TrainError),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::CheckpointError),
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    pub fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StageError + '_ {
        move |source| StageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
