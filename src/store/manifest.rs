//! `manifest.json`: what a store entry is, how it was made, and what it holds.

use serde::{Deserialize, Serialize};

use crate::plan::StageIdentity;
use crate::stages::Metrics;

/// One file of a store entry, with its size and blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub path: String,
    pub bytes: u64,
    pub blake3: String,
}

/// Who first built an entry (informational: names are not part of the key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltBy {
    pub experiment: String,
    pub stage: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub identity: StageIdentity,
    pub built_by: BuiltBy,
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub metrics: Metrics,
    pub outputs: Vec<OutputFile>,
}
