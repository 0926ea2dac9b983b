//! Leases: a run's claim on the store entries of its plan, so that gc never
//! deletes what a live run is about to read, nor what a killed run finished.
//!
//! A run writes `STORE/.leases/<host>-<pid>-<id>.json` (its plan's keys)
//! before it looks at any entry, and holds an exclusive lock on that file
//! while it lives; a thread touches the file's mtime every
//! [`REFRESH`] so that hosts which cannot see each other's locks (NFS
//! without lockd) can tell a live lease by its age. A run that finishes
//! removes its lease (its keys are in its run record from then on); a run
//! that fails or is killed leaves it behind.
//!
//! gc reads every lease:
//!
//! | lease                                            | its keys          |
//! |--------------------------------------------------|-------------------|
//! | locked (the run lives on this host)               | kept              |
//! | other host, touched within [`LIVE_TTL`]           | kept              |
//! | ended (unlocked), touched within [`ENDED_GRACE`]  | kept              |
//! | ended longer ago                                  | lease removed     |

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// How often a live run touches its lease.
pub const REFRESH: Duration = Duration::from_secs(60);
/// A lease from another host untouched this long is no longer live.
pub const LIVE_TTL: Duration = Duration::from_secs(10 * 60);
/// How long the entries of a killed or failed run are kept for its rerun.
pub const ENDED_GRACE: Duration = Duration::from_secs(24 * 3600);

pub const LEASES_DIR: &str = ".leases";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub host: String,
    pub pid: u32,
    pub experiment: String,
    pub root: PathBuf,
    pub started: String,
    pub keys: Vec<String>,
}

/// A live run's lease; removed by [`Lease::finish`], left behind otherwise.
pub struct Lease {
    path: PathBuf,
    _file: File,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
    /// A reader's lease (sample, score, export) goes when it is dropped.
    pub remove_on_drop: bool,
}

/// This machine's name (for lease files and the root registry).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

impl Lease {
    /// Write and lock a lease on `keys` in `store_dir`, holding the gc lock
    /// shared meanwhile (see [`super::lock::gc_lock`]).
    pub fn take(
        store: &super::Store,
        experiment: &str,
        root: &Path,
        keys: &BTreeSet<String>,
    ) -> io::Result<Lease> {
        let _gc = store.gc_lock(false)?;
        let dir = store.dir().join(LEASES_DIR);
        std::fs::create_dir_all(&dir)?;
        let host = host_name();
        let pid = std::process::id();
        let nonce = blake3::hash(format!("{pid}{:?}{experiment}", SystemTime::now()).as_bytes())
            .to_hex()[..8]
            .to_string();
        let safe_host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{safe_host}-{pid}-{nonce}.json"));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.lock()?;
        let info = LeaseInfo {
            host,
            pid,
            experiment: experiment.to_string(),
            root: root.to_path_buf(),
            started: crate::time::rfc3339(crate::time::unix_now()),
            keys: keys.iter().cloned().collect(),
        };
        file.write_all(&serde_json::to_vec_pretty(&info).map_err(io::Error::other)?)?;
        file.sync_all()?;
        let (stop, stopped) = mpsc::channel::<()>();
        let toucher = file.try_clone()?;
        let refresher = std::thread::spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(REFRESH) {
                let _ = toucher.set_modified(SystemTime::now());
            }
        });
        Ok(Lease {
            path,
            _file: file,
            stop: Some(stop),
            refresher: Some(refresher),
            remove_on_drop: false,
        })
    }

    /// The run finished: its keys are in its record now; drop the lease.
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        if self.remove_on_drop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What gc learnt from the leases.
#[derive(Debug, Default)]
pub struct LeaseScan {
    /// Keys of live runs.
    pub live: BTreeSet<String>,
    pub live_runs: usize,
    /// Keys of runs that ended without finishing, within [`ENDED_GRACE`].
    pub ended: BTreeSet<String>,
    pub ended_runs: usize,
    /// Leases past their grace, removed (or that would be, on a dry run).
    pub expired: usize,
}

/// Read every lease in the store (call with the gc lock held exclusively).
/// A live lease that cannot be read is an error: gc cannot know its keys.
pub fn scan(store_dir: &Path, dry_run: bool) -> io::Result<LeaseScan> {
    let mut scan = LeaseScan::default();
    let dir = store_dir.join(LEASES_DIR);
    let Ok(read) = std::fs::read_dir(&dir) else {
        return Ok(scan);
    };
    let here = host_name();
    for entry in read {
        let path = entry?.path();
        let Some(locked) = super::lock::is_locked(&path)? else {
            continue;
        };
        // A run that finishes meanwhile removes its lease: nothing to keep.
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let age = meta
            .modified()
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let info: Option<LeaseInfo> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(info) = info else {
            if locked || age < ENDED_GRACE {
                return Err(io::Error::other(format!(
                    "cannot read the lease {} of a recent run; gc cannot tell which entries it uses\n  help: wait for that run to end, or remove the file if no run is left",
                    path.display()
                )));
            }
            scan.expired += 1;
            if !dry_run {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        };
        let live = locked || (info.host != here && age < LIVE_TTL);
        if live {
            scan.live_runs += 1;
            scan.live.extend(info.keys);
        } else if age < ENDED_GRACE {
            scan.ended_runs += 1;
            scan.ended.extend(info.keys);
        } else {
            scan.expired += 1;
            if !dry_run {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lease_is_kept_a_finished_one_is_gone_an_ended_one_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::super::Store::new(dir.path());
        let keys: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let lease = Lease::take(&store, "exp", dir.path(), &keys).unwrap();
        // Another open file description of the same process sees the lock.
        let s = scan(dir.path(), true).unwrap();
        assert_eq!(s.live, keys);
        assert_eq!(s.live_runs, 1);
        drop(lease);
        let s = scan(dir.path(), true).unwrap();
        assert!(s.live.is_empty());
        assert_eq!(s.ended, keys, "an ended run's keys survive its grace");
        let lease = Lease::take(&store, "exp", dir.path(), &keys).unwrap();
        lease.finish();
        let s = scan(dir.path(), true).unwrap();
        assert_eq!(s.ended_runs, 1, "only the first lease is left");
    }
}
