//! Where a project lives: its root (the folder holding `experiments/`) and
//! its store.

use std::path::{Path, PathBuf};

use crate::store::Store;

/// Environment variable that moves the store (e.g. to shared storage).
pub const STORE_ENV: &str = "POSTTRAIN_STORE";

pub struct Project {
    pub root: PathBuf,
    pub store: Store,
}

impl Project {
    /// The nearest folder at or above `start` that has `experiments/`
    /// (else `start`); the store from `store` or `POSTTRAIN_STORE`, else
    /// `ROOT/results/store`.
    pub fn discover(start: &Path, store: Option<PathBuf>) -> Project {
        let root = start
            .ancestors()
            .find(|d| d.join("experiments").is_dir())
            .unwrap_or(start)
            .to_path_buf();
        let store_dir = store
            .or_else(|| std::env::var_os(STORE_ENV).map(PathBuf::from))
            .map(|d| if d.is_absolute() { d } else { start.join(d) })
            .unwrap_or_else(|| root.join("results").join("store"));
        Project {
            root,
            store: Store::new(store_dir),
        }
    }

    pub fn results_dir(&self) -> PathBuf {
        self.root.join("results")
    }
}
