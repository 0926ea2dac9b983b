//! The content-addressed store: one folder per cache key holding a stage's
//! output files and `manifest.json`.
//!
//! Layout of `STORE/` (default `results/store`, or `--store` /
//! `POSTTRAIN_STORE`):
//!
//! ```text
//! <key>/manifest.json   complete entries only: written last, then the
//! <key>/...             whole folder is renamed into place
//! .tmp/<key>.<pid>.<n>/ entries being built (or left by a killed run)
//! .locks/<key>.lock     held while a key is built
//! .resume/<key>/        resume snapshots of a training stage being built
//! .claims/<key>.json    the cluster job building a key (see claim)
//! .jobs/<key>/          what a cluster job builds (see runner::job)
//! .state/hashes.json    dataset hash cache (see plan::hash)
//! .cache/tokens/        tokenized datasets (see data::tokenize)
//! ```
//!
//! An entry is complete exactly when `<key>/manifest.json` parses and names
//! that key. Anything else at `<key>/` is corrupt: a warning and a miss.

pub mod claim;
pub mod lock;
pub mod manifest;

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

pub use lock::KeyLock;
pub use manifest::{BuiltBy, Manifest, OutputFile};

pub const MANIFEST: &str = "manifest.json";

pub struct Store {
    dir: PathBuf,
}

/// A folder where an entry is being built; removed on drop unless published.
pub struct Staging {
    pub dir: PathBuf,
    key: String,
    published: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join(".state")
    }

    /// Content-keyed caches shared by stages (tokenized datasets).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join(".cache")
    }

    /// Resume snapshots of a key's training stage (see `train::resume`):
    /// kept until the key is published, never an entry.
    pub fn resume_dir(&self, key: &str) -> PathBuf {
        self.dir.join(".resume").join(key)
    }

    fn locks_dir(&self) -> PathBuf {
        self.dir.join(".locks")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join(".tmp")
    }

    /// The manifest of a complete entry, `None` if absent or corrupt.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        let bytes = std::fs::read(self.entry_dir(key).join(MANIFEST)).ok()?;
        let manifest: Manifest = serde_json::from_slice(&bytes).ok()?;
        (manifest.identity.key == key).then_some(manifest)
    }

    pub fn is_complete(&self, key: &str) -> bool {
        self.manifest(key).is_some()
    }

    /// Wait for and take the build lock of `key`.
    pub fn lock(&self, key: &str, on_wait: impl FnOnce()) -> io::Result<KeyLock> {
        lock::lock_key(&self.locks_dir(), key, on_wait)
    }

    /// A fresh temporary folder to build `key` in.
    pub fn begin(&self, key: &str) -> io::Result<Staging> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self
            .tmp_dir()
            .join(format!("{key}.{}.{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Staging {
            dir,
            key: key.to_string(),
            published: false,
        })
    }

    /// Hash the staged files into `manifest.outputs`, write the manifest
    /// last, sync, and rename the folder into place. Call with the key's
    /// lock held. A previous (corrupt or forced-out) entry is moved aside
    /// first and deleted after.
    pub fn publish(&self, mut staging: Staging, mut manifest: Manifest) -> io::Result<PathBuf> {
        manifest.outputs = hash_outputs(&staging.dir)?;
        let manifest_path = staging.dir.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&manifest).map_err(io::Error::other)?;
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&manifest_path)?;
            f.write_all(&json)?;
            f.sync_all()?;
        }
        sync_dir(&staging.dir);
        let target = self.entry_dir(&staging.key);
        let mut old = None;
        if target.exists() {
            let aside = self
                .tmp_dir()
                .join(format!("{}.old.{}", staging.key, std::process::id()));
            std::fs::rename(&target, &aside)?;
            old = Some(aside);
        }
        std::fs::rename(&staging.dir, &target)?;
        staging.published = true;
        sync_dir(&self.dir);
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(target)
    }

    /// Keys of all complete entries.
    pub fn keys(&self) -> io::Result<BTreeSet<String>> {
        let mut keys = BTreeSet::new();
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Ok(keys);
        };
        for entry in read {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if !name.starts_with('.') {
                keys.insert(name);
            }
        }
        Ok(keys)
    }

    /// Remove entries not in `keep`, build folders no live run holds, and
    /// the caches under `.cache/`.
    pub fn gc(&self, keep: &BTreeSet<String>, dry_run: bool) -> io::Result<GcReport> {
        let mut report = GcReport::default();
        for key in self.keys()? {
            if keep.contains(&key) {
                continue;
            }
            let Some(_lock) = lock::try_lock_key(&self.locks_dir(), &key)? else {
                continue;
            };
            let dir = self.entry_dir(&key);
            report.bytes += dir_size(&dir);
            report.entries.push(key.clone());
            if !dry_run {
                std::fs::remove_dir_all(&dir)?;
                let _ = std::fs::remove_file(self.locks_dir().join(format!("{key}.lock")));
            }
        }
        if let Ok(read) = std::fs::read_dir(self.tmp_dir()) {
            for entry in read {
                let path = entry?.path();
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                let key = name.split('.').next().unwrap_or("").to_string();
                // A live build holds its key's lock; anything else is debris.
                let Some(_lock) = lock::try_lock_key(&self.locks_dir(), &key)? else {
                    continue;
                };
                report.bytes += dir_size(&path);
                report.temporary.push(name);
                if !dry_run {
                    std::fs::remove_dir_all(&path)?;
                }
            }
        }
        // Resume snapshots of keys no experiment needs any more.
        if let Ok(read) = std::fs::read_dir(self.dir.join(".resume")) {
            for entry in read {
                let path = entry?.path();
                let key = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if keep.contains(&key) {
                    continue;
                }
                let Some(_lock) = lock::try_lock_key(&self.locks_dir(), &key)? else {
                    continue;
                };
                report.bytes += dir_size(&path);
                report.temporary.push(format!(".resume/{key}"));
                if !dry_run {
                    std::fs::remove_dir_all(&path)?;
                }
            }
        }
        // Caches are only speed: gc empties them (they refill on demand).
        let cache = self.cache_dir();
        if cache.exists() {
            report.cache_bytes = dir_size(&cache);
            report.bytes += report.cache_bytes;
            if !dry_run {
                std::fs::remove_dir_all(&cache)?;
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub entries: Vec<String>,
    pub temporary: Vec<String>,
    /// Bytes of content-keyed caches (tokenized datasets) removed.
    pub cache_bytes: u64,
    pub bytes: u64,
}

fn hash_outputs(dir: &Path) -> io::Result<Vec<OutputFile>> {
    let mut outputs = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let entry = entry.map_err(io::Error::other)?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry.path().strip_prefix(dir).unwrap_or(entry.path());
        let rel = rel.to_string_lossy().replace('\\', "/");
        if rel == MANIFEST {
            continue;
        }
        let len = entry.metadata().map_err(io::Error::other)?.len();
        // Flush the file to disk before the rename makes it visible.
        std::fs::File::open(entry.path())?.sync_all()?;
        outputs.push(OutputFile {
            path: rel,
            bytes: len,
            blake3: crate::plan::hash::hash_file_contents(entry.path(), len)?,
        });
    }
    Ok(outputs)
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn dir_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}
