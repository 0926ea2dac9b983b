//! The registry of projects that use a store: `STORE/.roots/<id>.json`, one
//! file per project root (and host), so that gc on a shared store keeps what
//! every project uses, not only the one it runs in.
//!
//! A run records, for its experiment: the file, the keys of its whole plan
//! (what the experiment file references now, kept even when the root is not
//! reachable from where gc runs), and the keys of its last [`MAX_RUNS`]
//! finished runs, newest first (`gc --last-runs N` keeps N of them).
//! `gc --forget ROOT` removes a root that is gone for good.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const ROOTS_DIR: &str = ".roots";
/// Finished runs remembered per experiment.
pub const MAX_RUNS: usize = 20;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RootRecord {
    pub root: PathBuf,
    pub host: String,
    pub updated: String,
    pub experiments: BTreeMap<String, ExperimentRecord>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub file: PathBuf,
    /// Keys of the experiment's plan when it last ran.
    pub planned: Vec<String>,
    /// Keys of its finished runs, newest first.
    pub runs: Vec<RunKeys>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunKeys {
    pub finished: String,
    pub keys: Vec<String>,
}

fn root_id(host: &str, root: &Path) -> String {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    blake3::hash(format!("{host}\0{}", root.display()).as_bytes()).to_hex()[..16].to_string()
}

fn record_path(store_dir: &Path, host: &str, root: &Path) -> PathBuf {
    store_dir
        .join(ROOTS_DIR)
        .join(format!("{}.json", root_id(host, root)))
}

/// Update this root's record under its lock (runs of one project may end
/// at once): `planned` replaces the experiment's plan keys; `finished`,
/// when given, is pushed as its newest run.
pub fn record(
    store: &super::Store,
    root: &Path,
    experiment: &str,
    file: &Path,
    planned: &BTreeSet<String>,
    finished: Option<&BTreeSet<String>>,
) -> io::Result<()> {
    let host = super::lease::host_name();
    let path = record_path(store.dir(), &host, root);
    let _lock = super::lock::lock_key(
        &store.locks_dir(),
        &format!("root-{}", root_id(&host, root)),
        || {},
    )?;
    let mut rec: RootRecord = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    rec.root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    rec.host = host;
    rec.updated = crate::time::rfc3339(crate::time::unix_now());
    let exp = rec.experiments.entry(experiment.to_string()).or_default();
    exp.file = file.to_path_buf();
    exp.planned = planned.iter().cloned().collect();
    if let Some(keys) = finished {
        exp.runs.insert(
            0,
            RunKeys {
                finished: rec.updated.clone(),
                keys: keys.iter().cloned().collect(),
            },
        );
        exp.runs.truncate(MAX_RUNS);
    }
    std::fs::create_dir_all(path.parent().expect("under .roots"))?;
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&rec).map_err(io::Error::other)?,
    )?;
    std::fs::rename(tmp, path)
}

/// Every registered root.
pub fn all(store_dir: &Path) -> Vec<(PathBuf, RootRecord)> {
    let Ok(read) = std::fs::read_dir(store_dir.join(ROOTS_DIR)) else {
        return Vec::new();
    };
    let mut roots: Vec<(PathBuf, RootRecord)> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let rec = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, rec))
        })
        .collect();
    roots.sort_by(|a, b| a.1.root.cmp(&b.1.root));
    roots
}

/// Remove the registration of `root` (any host); returns how many.
pub fn forget(store_dir: &Path, root: &Path) -> io::Result<usize> {
    let wanted = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let mut n = 0;
    for (path, rec) in all(store_dir) {
        if rec.root == wanted || rec.root == root {
            std::fs::remove_file(path)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_kept_newest_first_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::new(dir.path().join("store"));
        let root = dir.path().join("proj");
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..(MAX_RUNS + 3) {
            let keys: BTreeSet<String> = [format!("k{i}")].into();
            record(&store, &root, "e", Path::new("e.toml"), &keys, Some(&keys)).unwrap();
        }
        let roots = all(store.dir());
        assert_eq!(roots.len(), 1);
        let exp = &roots[0].1.experiments["e"];
        assert_eq!(exp.runs.len(), MAX_RUNS);
        assert_eq!(exp.runs[0].keys, [format!("k{}", MAX_RUNS + 2)]);
        assert_eq!(forget(store.dir(), &root).unwrap(), 1);
        assert!(all(store.dir()).is_empty());
    }
}
