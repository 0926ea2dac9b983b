//! Datasets must not change under a running stage: its key was made from
//! their content when the run planned it. Before a stage runs, its dataset
//! files are hashed again (cheap when their stat is unchanged, see
//! [`super::hash`]) and compared with the key's; before it publishes, their
//! stat (size, mtime, ctime, inode) must be what it was when it started.
//! ctime moves on every write or replace, so a file edited and restored
//! while the stage read it is caught as well. A change refuses the publish:
//! nothing is stored under a key that does not describe what was read.

use std::path::{Path, PathBuf};

use super::hash::{stat_times, HashCache};
use super::StageIdentity;

type Stat = (u64, i128, i128, u64);

/// The stat of every file of a stage's datasets when it started.
#[derive(Debug, Default)]
pub struct DatasetSnapshot {
    files: Vec<(String, PathBuf, Stat)>,
    /// Each dataset's path and its list of files (a folder may gain one).
    listings: Vec<(String, PathBuf, Vec<PathBuf>)>,
}

fn stat(path: &Path) -> std::io::Result<Stat> {
    let meta = std::fs::metadata(path)?;
    let (m, c, i) = stat_times(&meta);
    Ok((meta.len(), m, c, i))
}

fn files_of(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(path)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    files.sort();
    files
}

/// Check that each dataset still hashes to what the key was made from, and
/// note the stat of its files. `Err` names the dataset that changed.
pub fn before_run(
    root: &Path,
    identity: &StageIdentity,
    hashes: &mut HashCache,
) -> Result<DatasetSnapshot, String> {
    let mut snap = DatasetSnapshot::default();
    for d in &identity.datasets {
        let path = root.join(&d.path);
        let files = files_of(&path);
        for f in &files {
            let s = stat(f).map_err(|e| format!("dataset `{}`: {e}", d.path))?;
            snap.files.push((d.path.clone(), f.clone(), s));
        }
        snap.listings.push((d.path.clone(), path.clone(), files));
        let now = hashes
            .hash_path(&path)
            .map_err(|e| format!("dataset `{}`: {e}", d.path))?;
        if now != d.hash {
            return Err(format!(
                "dataset `{}` changed after the run planned this stage (content hash {} then, {} now)",
                d.path,
                &d.hash[..12.min(d.hash.len())],
                &now[..12]
            ));
        }
    }
    Ok(snap)
}

/// Check that no dataset file was written, replaced or removed since
/// [`before_run`].
pub fn before_publish(snap: &DatasetSnapshot) -> Result<(), String> {
    for (dataset, path, files) in &snap.listings {
        if files_of(path) != *files {
            return Err(format!(
                "dataset `{dataset}` changed while the stage ran (files were added to or removed from {})",
                path.display()
            ));
        }
    }
    for (dataset, file, then) in &snap.files {
        match stat(file) {
            Ok(now) if now == *then => {}
            _ => {
                return Err(format!(
                    "dataset `{dataset}` changed while the stage ran ({} was written, replaced or removed)",
                    file.display()
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DatasetInput;

    fn identity(hash: String) -> StageIdentity {
        StageIdentity {
            key: "k".into(),
            kind: "dataset".into(),
            recipe_version: 1,
            seed: 0,
            settings: serde_json::json!({}),
            upstream: vec![],
            datasets: vec![DatasetInput {
                field: "input".into(),
                path: "d".into(),
                hash,
            }],
        }
    }

    #[test]
    fn an_edit_before_the_stage_and_an_edit_restored_during_it_are_both_caught() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("a.txt"), "original").unwrap();
        let mut hashes = HashCache::in_memory();
        let planned = identity(hashes.hash_path(&dir).unwrap());

        let snap = before_run(root.path(), &planned, &mut hashes).unwrap();
        assert!(before_publish(&snap).is_ok());
        // Edited and restored while the stage read it: same bytes, new ctime.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(dir.join("a.txt"), "edited!!").unwrap();
        std::fs::write(dir.join("a.txt"), "original").unwrap();
        let err = before_publish(&snap).unwrap_err();
        assert!(err.contains("changed while the stage ran"), "{err}");

        let snap = before_run(root.path(), &planned, &mut hashes).unwrap();
        std::fs::write(dir.join("b.txt"), "new file").unwrap();
        assert!(before_publish(&snap)
            .unwrap_err()
            .contains("added to or removed"));

        std::fs::write(dir.join("a.txt"), "edited!!").unwrap();
        let err = before_run(root.path(), &planned, &mut hashes).unwrap_err();
        assert!(
            err.contains("changed after the run planned this stage"),
            "{err}"
        );
    }
}
