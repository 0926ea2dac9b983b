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
