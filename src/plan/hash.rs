//! Content hashes of dataset files and folders, with a state cache so that
//! unchanged large files are not re-read on every run (as DVC's state db).
//!
//! A cached hash is reused only when size, mtime, ctime and inode all match
//! what was recorded, and the file's mtime was at least two seconds older
//! than the moment it was hashed: a file written in the same second as it
//! was hashed could change again without its mtime moving ("racy" entries,
//! the problem git's index has), so such entries are always re-hashed.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const RACY_WINDOW_NS: i128 = 2_000_000_000;
/// Files at least this large are hashed with memory mapping on all cores.
const MMAP_THRESHOLD: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    inode: u64,
    hashed_at_ns: i128,
    hash: String,
}

/// Hashes of files seen before, kept in `STORE/.state/hashes.json`.
pub struct HashCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Entry>,
    dirty: bool,
    /// Bytes actually read (not served from the cache), for benchmarks.
    pub bytes_hashed: u64,
}

impl HashCache {
    /// A cache persisted in `state_dir`; an unreadable file is an empty cache.
    pub fn open(state_dir: &Path) -> HashCache {
        let path = state_dir.join("hashes.json");
        let entries = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        HashCache {
            path: Some(path),
            entries,
            dirty: false,
            bytes_hashed: 0,
        }
    }

    /// A cache that lives only in memory.
    pub fn in_memory() -> HashCache {
        HashCache {
            path: None,
            entries: BTreeMap::new(),
            dirty: false,
            bytes_hashed: 0,
        }
    }

    /// blake3 of a file, or of a folder's files (sorted relative paths and
    /// their hashes) found with walkdir.
    pub fn hash_path(&mut self, path: &Path) -> io::Result<String> {
        let meta = std::fs::metadata(path)?;
        if meta.is_file() {
            return self.hash_file(path, &meta);
        }
        let mut listing = String::new();
        let mut walker: Vec<walkdir::DirEntry> = walkdir::WalkDir::new(path)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(io::Error::other)?;
        walker.retain(|e| e.file_type().is_file());
        for entry in walker {
            let rel = entry.path().strip_prefix(path).unwrap_or(entry.path());
            let meta = entry.metadata().map_err(io::Error::other)?;
            let hash = self.hash_file(entry.path(), &meta)?;
            listing.push_str(&format!("{}\0{hash}\n", rel.to_string_lossy()));
        }
        Ok(blake3::hash(listing.as_bytes()).to_hex().to_string())
    }

    fn hash_file(&mut self, path: &Path, meta: &std::fs::Metadata) -> io::Result<String> {
        let id = path
            .canonicalize()
            .unwrap_or_else(|_| path.to_path_buf())
            .to_string_lossy()
            .into_owned();
        let (mtime_ns, ctime_ns, inode) = stat_times(meta);
        if let Some(e) = self.entries.get(&id) {
            let same = e.size == meta.len()
                && e.mtime_ns == mtime_ns
                && e.ctime_ns == ctime_ns
                && e.inode == inode;
            let settled = mtime_ns.max(ctime_ns) + RACY_WINDOW_NS <= e.hashed_at_ns;
            if same && settled {
                return Ok(e.hash.clone());
            }
        }
        let hashed_at_ns = now_ns();
        let hash = hash_file_contents(path, meta.len())?;
        self.bytes_hashed += meta.len();
        self.entries.insert(
            id,
            Entry {
                size: meta.len(),
                mtime_ns,
                ctime_ns,
                inode,
                hashed_at_ns,
                hash: hash.clone(),
            },
        );
        self.dirty = true;
        Ok(hash)
    }

    /// Write the cache back (temp file + rename, so concurrent runs never
    /// see half a file; the last writer wins, which only costs a re-hash).
    pub fn save(&mut self) -> io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let dir = path.parent().expect("state file has a folder");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".hashes.{}.tmp", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec(&self.entries).map_err(io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)?;
        self.dirty = false;
        Ok(())
    }
}

/// blake3 of a file's bytes; large files are memory-mapped and hashed with
/// rayon (blake3's tree mode parallelises within one file).
pub fn hash_file_contents(path: &Path, len: u64) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if len >= MMAP_THRESHOLD {
        hasher.update_mmap_rayon(path)?;
    } else {
        hasher.update_reader(std::fs::File::open(path)?)?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(unix)]
fn stat_times(meta: &std::fs::Metadata) -> (i128, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        meta.ino(),
    )
}

#[cfg(not(unix))]
fn stat_times(meta: &std::fs::Metadata) -> (i128, i128, u64) {
    let m = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128);
    (m, m, 0)
}

fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_hash_changes_with_any_file_and_cache_never_hides_a_change() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("a.txt"), b"one").unwrap();
        std::fs::write(dir.path().join("sub/b.txt"), b"two").unwrap();
        let mut cache = HashCache::in_memory();
        let h1 = cache.hash_path(dir.path()).unwrap();
        assert_eq!(h1, cache.hash_path(dir.path()).unwrap());
        // Same size, same second: the racy-entry rule forces a re-hash.
        std::fs::write(dir.path().join("sub/b.txt"), b"tw0").unwrap();
        let h2 = cache.hash_path(dir.path()).unwrap();
        assert_ne!(h1, h2);
        assert_eq!(
            cache.hash_path(&dir.path().join("a.txt")).unwrap(),
            blake3::hash(b"one").to_hex().to_string()
        );
    }
}
