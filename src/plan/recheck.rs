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
