//! Claims: which cluster job is building a key. A claim is a file
//! `STORE/.claims/<key>.json` created with O_CREAT|O_EXCL (atomic on local
//! filesystems and on NFS v3 and later, unlike an OS lock), so of two runs
//! that submit the same stage at once exactly one submits it; the other
//! depends on the claimed job. A claim whose job is no longer queued or
//! running is stale and is taken over.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a claim file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    /// The Slurm job id, once submitted (empty while being submitted).
    pub job: String,
    pub experiment: String,
    pub stage: String,
    /// The job's log file.
    pub log: PathBuf,
    pub host: String,
    pub pid: u32,
    /// Seconds since the epoch when the claim was taken.
    pub since: u64,
}

/// The claims folder of a store.
pub struct Claims {
    dir: PathBuf,
}

impl Claims {
    pub fn new(store: &Path) -> Claims {
        Claims {
            dir: store.join(".claims"),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Take the claim of `key`; `Ok(false)` when another holds it.
    pub fn try_take(&self, key: &str, claim: &Claim) -> io::Result<bool> {
        std::fs::create_dir_all(&self.dir)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path(key));
        match file {
            Ok(mut f) => {
                f.write_all(&serde_json::to_vec(claim).map_err(io::Error::other)?)?;
                f.sync_all()?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Rewrite a claim we hold (to record the job id), atomically.
    pub fn update(&self, key: &str, claim: &Claim) -> io::Result<()> {
        let tmp = self
            .dir
            .join(format!("{key}.json.tmp.{}", std::process::id()));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(claim).map_err(io::Error::other)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path(key))
    }

    /// The claim of `key`, if any (`None` also while it is half-written).
    pub fn read(&self, key: &str) -> Option<Claim> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Whether a claim file exists (even one that does not parse yet).
    pub fn exists(&self, key: &str) -> bool {
        self.path(key).exists()
    }

    /// Remove the claim of `key` if it still names `job` (a stale claim's
    /// taker and its owner must not remove each other's).
    pub fn release(&self, key: &str, job: &str) {
        if self.read(key).is_some_and(|c| c.job == job) {
            let _ = std::fs::remove_file(self.path(key));
        }
    }

    /// Remove the claim of `key` whatever it holds (a stale one).
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(job: &str) -> Claim {
        Claim {
            job: job.into(),
            experiment: "e".into(),
            stage: "s".into(),
            log: PathBuf::from("/tmp/log"),
            host: "h".into(),
            pid: 1,
            since: 0,
        }
    }

    #[test]
    fn one_taker_wins_and_release_checks_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let claims = Claims::new(dir.path());
        assert!(claims.try_take("k", &claim("")).unwrap());
        assert!(!claims.try_take("k", &claim("")).unwrap());
        claims.update("k", &claim("12")).unwrap();
        assert_eq!(claims.read("k").unwrap().job, "12");
        claims.release("k", "13");
        assert!(claims.exists("k"), "another job's release leaves it");
        claims.release("k", "12");
        assert!(!claims.exists("k"));
        assert!(claims.try_take("k", &claim("")).unwrap());
    }
}
