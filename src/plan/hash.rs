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

/// blake3 of a file's bytes. Small files are read plainly. A large file
/// that is mostly in the page cache is memory-mapped and hashed on all
/// cores (blake3's tree mode parallelises within one file); one that is
/// not is read from disk sequentially with O_DIRECT in large blocks while
/// the previous block is hashed, because buffered and mmap reads on these
/// virtual disks reach only a third of what direct reads do.
pub fn hash_file_contents(path: &Path, len: u64) -> io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    if len < MMAP_THRESHOLD {
        hasher.update_reader(std::fs::File::open(path)?)?;
        return Ok(hasher.finalize().to_hex().to_string());
    }
    #[cfg(target_os = "linux")]
    if direct::resident_fraction(path, len).is_ok_and(|f| f < 0.5) {
        if let Some(hash) = direct::hash(path)? {
            return Ok(hash.to_hex().to_string());
        }
    }
    hasher.update_mmap_rayon(path)?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(target_os = "linux")]
mod direct {
    use std::alloc::{alloc, dealloc, Layout};
    use std::io::{self, Read};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::sync::mpsc;

    const BLOCK: usize = 16 << 20;
    const ALIGN: usize = 4096;

    /// Share of the file's pages in the page cache (mincore).
    pub fn resident_fraction(path: &Path, len: u64) -> io::Result<f64> {
        let file = std::fs::File::open(path)?;
        // SAFETY: the map is only used for its address range; no byte is read.
        let map = unsafe { memmap2::Mmap::map(&file)? };
        let page = 4096usize;
        let pages = (len as usize).div_ceil(page);
        let mut resident = vec![0u8; pages];
        // SAFETY: `resident` has one byte per page of the mapped range.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr() as *mut libc::c_void,
                len as usize,
                resident.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(resident.iter().filter(|b| **b & 1 == 1).count() as f64 / pages.max(1) as f64)
    }

    /// A heap buffer aligned for O_DIRECT.
    struct Aligned(*mut u8);
    // SAFETY: the buffer is owned and moved between threads, never shared.
    unsafe impl Send for Aligned {}
    impl Aligned {
        fn new() -> Aligned {
            let layout = Layout::from_size_align(BLOCK, ALIGN).expect("valid layout");
            // SAFETY: non-zero size; checked for null below.
            let ptr = unsafe { alloc(layout) };
            assert!(
                !ptr.is_null(),
                "out of memory for a {BLOCK}-byte read buffer"
            );
            Aligned(ptr)
        }
        fn slice(&mut self) -> &mut [u8] {
            // SAFETY: BLOCK bytes were allocated; u8 has no invalid values
            // and the kernel writes before we read.
            unsafe { std::slice::from_raw_parts_mut(self.0, BLOCK) }
        }
    }
    impl Drop for Aligned {
        fn drop(&mut self) {
            // SAFETY: allocated in `new` with this layout.
            unsafe {
                dealloc(
                    self.0,
                    Layout::from_size_align(BLOCK, ALIGN).expect("valid layout"),
                )
            }
        }
    }

    /// Hash with a reader thread doing O_DIRECT reads; `None` when the file
    /// system refuses O_DIRECT (tmpfs), so the caller falls back.
    pub fn hash(path: &Path) -> io::Result<Option<blake3::Hash>> {
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(Aligned, usize)>>(1);
        let (empty_tx, empty_rx) = mpsc::channel::<Aligned>();
        for _ in 0..3 {
            empty_tx.send(Aligned::new()).expect("receiver alive");
        }
        let mut hasher = blake3::Hasher::new();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                while let Ok(mut buf) = empty_rx.recv() {
                    let mut filled = 0;
                    let result = loop {
                        match file.read(&mut buf.slice()[filled..]) {
                            Ok(0) => break Ok(()),
                            Ok(n) => {
                                filled += n;
                                // A short read that is not block-aligned is the end of the file.
                                if filled == BLOCK || n % ALIGN != 0 {
                                    break Ok(());
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => break Err(e),
                        }
                    };
                    let done = filled < BLOCK || result.is_err();
                    if full_tx.send(result.map(|()| (buf, filled))).is_err() || done {
                        return;
                    }
                }
            });
            while let Ok(block) = full_rx.recv() {
                let (mut buf, n) = block?;
                hasher.update(&buf.slice()[..n]);
                let last = n < BLOCK;
                let _ = empty_tx.send(buf);
                if last {
                    break;
                }
            }
            Ok::<(), io::Error>(())
        })?;
        Ok(Some(hasher.finalize()))
    }
}

#[cfg(unix)]
pub(crate) fn stat_times(meta: &std::fs::Metadata) -> (i128, i128, u64) {
    use std::os::unix::fs::MetadataExt;
    (
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        meta.ino(),
    )
}

#[cfg(not(unix))]
pub(crate) fn stat_times(meta: &std::fs::Metadata) -> (i128, i128, u64) {
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

    #[cfg(target_os = "linux")]
    #[test]
    fn direct_reads_hash_like_plain_blake3() {
        // Not a multiple of the block or page size, to exercise the tail.
        let data: Vec<u8> = (0..(8 << 20) * 2 + 12_345)
            .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let path = dir.path().join("big.bin");
        std::fs::write(&path, &data).unwrap();
        let expected = blake3::hash(&data);
        if let Some(h) = direct::hash(&path).unwrap() {
            assert_eq!(h, expected);
        }
        assert_eq!(
            hash_file_contents(&path, data.len() as u64).unwrap(),
            expected.to_hex().to_string()
        );
    }
}
