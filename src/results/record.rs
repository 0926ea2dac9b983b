//! `results/EXP/last_run.json`: the identity of every stage at the
//! experiment's last successful run. `plan` compares against it to say why
//! a stage is stale; `gc` keeps the store entries it names.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::plan::StageIdentity;
use crate::stages::Metrics;

pub const RECORD_FILE: &str = "last_run.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    #[serde(flatten)]
    pub identity: StageIdentity,
    /// "ran" or "cached".
    pub status: String,
    pub duration_s: f64,
    pub metrics: Metrics,
    pub store_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub experiment: String,
    pub file: PathBuf,
    pub finished: String,
    pub stages: BTreeMap<String, StageRecord>,
}

impl RunRecord {
    /// The record in `dir`, `None` if there is none or it is unreadable.
    pub fn read(dir: &Path) -> Option<RunRecord> {
        let bytes = std::fs::read(dir.join(RECORD_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Write atomically (temp file + rename).
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".{RECORD_FILE}.{}.tmp", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )?;
        std::fs::rename(tmp, dir.join(RECORD_FILE))
    }
}

/// Every run record under `results/`, for gc.
pub fn all_records(results_dir: &Path) -> Vec<RunRecord> {
    let Ok(read) = std::fs::read_dir(results_dir) else {
        return Vec::new();
    };
    read.filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .filter_map(|e| RunRecord::read(&e.path()))
        .collect()
}
