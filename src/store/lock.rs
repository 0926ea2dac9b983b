//! All store locking lives here: one lock file per key, held while the key
//! is built, so two runs never build the same key at once. The OS releases
//! the lock when the process dies, so a killed run never blocks the next.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::path::Path;

/// The lock file of `key`, created if missing (never truncated: another
/// process may hold a lock on it).
fn lock_file(locks_dir: &Path, key: &str) -> io::Result<File> {
    std::fs::create_dir_all(locks_dir)?;
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(locks_dir.join(format!("{key}.lock")))
}

/// Holds an exclusive lock on one key until dropped.
pub struct KeyLock {
    _file: File,
}

/// Lock `key`, waiting for another process that holds it. `on_wait` is
/// called once if we have to wait (to tell the user why nothing moves).
pub fn lock_key(locks_dir: &Path, key: &str, on_wait: impl FnOnce()) -> io::Result<KeyLock> {
    let file = lock_file(locks_dir, key)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            on_wait();
            file.lock()?;
        }
        Err(TryLockError::Error(e)) => return Err(e),
    }
    Ok(KeyLock { _file: file })
}

/// Lock `key` only if nobody holds it.
pub fn try_lock_key(locks_dir: &Path, key: &str) -> io::Result<Option<KeyLock>> {
    let file = lock_file(locks_dir, key)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(KeyLock { _file: file })),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// The store-wide gc lock (`.locks/gc.lock`): gc holds it exclusively for
/// its whole scan and delete; a run holds it shared while it writes its
/// lease. So a lease is either seen by gc, or written after gc finished,
/// and a run checks each entry again after its lease is written.
pub struct GcLock {
    _file: File,
}

pub fn gc_lock(locks_dir: &Path, exclusive: bool) -> io::Result<GcLock> {
    let file = lock_file(locks_dir, "gc")?;
    if exclusive {
        file.lock()?;
    } else {
        file.lock_shared()?;
    }
    Ok(GcLock { _file: file })
}

/// Whether another process holds an exclusive lock on `path` (a lease).
/// `None` when the file is gone.
pub fn is_locked(path: &Path) -> io::Result<Option<bool>> {
    let file = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Some(false)),
        Err(TryLockError::WouldBlock) => Ok(Some(true)),
        Err(TryLockError::Error(e)) => Err(e),
    }
}
