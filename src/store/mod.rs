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
//! .trash/<key>.<pid>.<n>/ entries being deleted: moved here first, then removed
//! .locks/<key>.lock     held while a key is built
//! .resume/<key>/        resume snapshots of a training stage being built
//! .claims/<key>.json    the cluster job building a key (see claim)
//! .jobs/<key>/          what a cluster job builds (see runner::job)
//! .locks/gc.lock        held by gc (exclusive) and by runs taking a lease (shared)
//! .leases/<host>-<pid>-<id>.json  the keys a live (or killed) run uses (see lease)
//! .roots/<id>.json      every project that uses this store (see registry)
//! .state/hashes.json    dataset hash cache (see plan::hash)
//! .cache/tokens/        tokenized datasets (see data::tokenize)
//! ```
//!
//! An entry is complete exactly when `<key>/manifest.json` parses, names
//! that key, and every file it lists is there with its size (a stat per
//! file, so a hit stays cheap; `posttrain verify` rehashes them). Anything
//! else at `<key>/` is corrupt: a warning and a miss. Deleting is
//! publishing in reverse: the entry is renamed out of place, then removed,
//! so a killed gc never leaves half an entry at `<key>/`.

pub mod claim;
pub mod keep;
pub mod lease;
pub mod lock;
pub mod manifest;
pub mod registry;
pub mod verify;

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

    pub(crate) fn locks_dir(&self) -> PathBuf {
        self.dir.join(".locks")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.dir.join(".tmp")
    }

    fn trash_dir(&self) -> PathBuf {
        self.dir.join(".trash")
    }

    /// Refuse a store path that exists but is not a folder (`--store FILE`),
    /// before any lock or build folder is made inside it.
    pub fn check_usable(&self) -> Result<(), String> {
        match std::fs::metadata(&self.dir) {
            Ok(m) if !m.is_dir() => Err(format!(
                "the store `{}` is not a folder\n  help: give --store (or POSTTRAIN_STORE) a folder; it is created if missing",
                self.dir.display()
            )),
            _ => Ok(()),
        }
    }

    /// The manifest of a complete entry, `None` if absent or corrupt.
    pub fn manifest(&self, key: &str) -> Option<Manifest> {
        self.checked_manifest(key).ok()
    }

    /// The manifest of `key`, or what is wrong with the entry: absent, an
    /// unreadable manifest, or a listed file missing or of the wrong size.
    pub fn checked_manifest(&self, key: &str) -> Result<Manifest, String> {
        let dir = self.entry_dir(key);
        let bytes = std::fs::read(dir.join(MANIFEST)).map_err(|e| format!("{MANIFEST}: {e}"))?;
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{MANIFEST} does not parse: {e}"))?;
        if manifest.identity.key != key {
            return Err(format!(
                "{MANIFEST} names key {}, not {key}",
                manifest.identity.key
            ));
        }
        for out in &manifest.outputs {
            match std::fs::metadata(dir.join(&out.path)) {
                Err(e) => return Err(format!("`{}` listed in its manifest: {e}", out.path)),
                Ok(m) if m.len() != out.bytes => {
                    return Err(format!(
                        "`{}` has {} bytes, its manifest says {}",
                        out.path,
                        m.len(),
                        out.bytes
                    ))
                }
                Ok(_) => {}
            }
        }
        Ok(manifest)
    }

    /// What is wrong with the entry at `key`, `None` when there is no
    /// folder at all (never built) or it is complete.
    pub fn problem(&self, key: &str) -> Option<String> {
        if !self.entry_dir(key).exists() {
            return None;
        }
        self.checked_manifest(key).err()
    }

    /// Remove an entry: rename it into `.trash/` (one atomic step, after
    /// which `<key>/` is gone), then delete it there.
    pub fn unpublish(&self, key: &str) -> io::Result<()> {
        let aside = self.move_to_trash(&self.entry_dir(key), key)?;
        std::fs::remove_dir_all(aside)
    }

    fn move_to_trash(&self, path: &Path, key: &str) -> io::Result<PathBuf> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::fs::create_dir_all(self.trash_dir())?;
        let aside = self
            .trash_dir()
            .join(format!("{key}.{}.{n}", std::process::id()));
        std::fs::rename(path, &aside)?;
        sync_dir(&self.dir);
        Ok(aside)
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
            old = Some(self.move_to_trash(&target, &staging.key)?);
        }
        std::fs::rename(&staging.dir, &target)?;
        staging.published = true;
        sync_dir(&self.dir);
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(target)
    }

    /// Take the store-wide gc lock: exclusive for gc, shared for a run
    /// writing its lease (so gc sees every lease written before it began).
    pub fn gc_lock(&self, exclusive: bool) -> io::Result<lock::GcLock> {
        lock::gc_lock(&self.locks_dir(), exclusive)
    }

    /// Names of all entry folders (complete or not; see [`Store::manifest`]).
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

    /// Remove entries not in `keep` (and, with `older_than`, published
    /// longer ago than that), build folders no live run holds, deletions a
    /// killed gc left in `.trash/`, and the caches under `.cache/`. Call it
    /// with [`Store::gc_lock`] held, so no run takes a lease meanwhile.
    pub fn gc(
        &self,
        keep: &BTreeSet<String>,
        older_than: Option<std::time::Duration>,
        keep_caches: bool,
        dry_run: bool,
    ) -> io::Result<GcReport> {
        let mut report = GcReport::default();
        for key in self.keys()? {
            if keep.contains(&key) {
                continue;
            }
            let dir = self.entry_dir(&key);
            if let Some(min_age) = older_than {
                let published = std::fs::metadata(dir.join(MANIFEST))
                    .or_else(|_| std::fs::metadata(&dir))
                    .and_then(|m| m.modified())
                    .ok();
                let age = published.and_then(|t| t.elapsed().ok()).unwrap_or_default();
                if age < min_age {
                    report.young += 1;
                    continue;
                }
            }
            let Some(_lock) = lock::try_lock_key(&self.locks_dir(), &key)? else {
                continue;
            };
            if !dir.exists() {
                continue; // verify moved it out meanwhile
            }
            report.bytes += dir_size(&dir);
            report.entries.push(key.clone());
            if !dry_run {
                self.unpublish(&key)?;
                let _ = std::fs::remove_file(self.locks_dir().join(format!("{key}.lock")));
            }
        }
        if let Ok(read) = std::fs::read_dir(self.trash_dir()) {
            for entry in read {
                let path = entry?.path();
                report.bytes += dir_size(&path);
                report.trash += 1;
                if !dry_run {
                    remove_if_there(&path)?;
                }
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
                    remove_if_there(&path)?;
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
                    remove_if_there(&path)?;
                }
            }
        }
        // Caches are only speed: gc empties them (they refill on demand),
        // unless a live run may be writing them (`keep_caches`).
        let cache = self.cache_dir();
        if cache.exists() && !keep_caches {
            report.cache_bytes = dir_size(&cache);
            report.bytes += report.cache_bytes;
            if !dry_run {
                // A run starting now may be writing it: what is left is
                // only speed, the next gc tries again.
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
        Ok(report)
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub entries: Vec<String>,
    /// Entries not kept but younger than `--older-than`, left alone.
    pub young: usize,
    /// Deletions a killed gc left in `.trash/`, finished now.
    pub trash: usize,
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

/// Remove a folder that a run may remove first (a build folder it just
/// published, an old entry it moved aside and deleted itself).
fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
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
