//! What a cluster job builds: one stage's key, written down when the run
//! planned it (`STORE/.jobs/<key>/spec.json`), so the job builds exactly
//! what was planned even if the experiment file changes meanwhile. The job
//! runs `posttrain build-job SPEC`, which parses the stage's settings as
//! written, checks that its datasets still hash as planned, and builds the
//! key into the store through the same path as the local executor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::build::{build_stage, BuildSpec, Built, Console};
use super::{store_err, Project, RunError};
use crate::plan::{HashCache, StageIdentity};
use crate::stages::StageSettings;
use crate::store::Store;

pub const SPEC_FILE: &str = "spec.json";
pub const SCRIPT_FILE: &str = "job.sh";

/// One stage's build, as planned.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobSpec {
    pub experiment: String,
    pub stage: String,
    pub seed: u64,
    /// The stage's settings table as written (TOML text).
    pub settings: String,
    pub identity: StageIdentity,
    /// The project root (datasets are relative to it; the job's cwd).
    pub root: PathBuf,
    pub force: bool,
    /// The kind of every stage of the experiment, for the defaults that
    /// depend on what another field names (`experiment::defaults`).
    pub kinds: BTreeMap<String, String>,
}

/// The job folder of a key in a store.
pub fn job_dir(store: &Store, key: &str) -> PathBuf {
    store.dir().join(".jobs").join(key)
}

/// Write the spec and the job script; returns the script's path.
pub fn write(store: &Store, spec: &JobSpec, exe: &Path) -> Result<PathBuf, RunError> {
    let dir = job_dir(store, &spec.identity.key);
    std::fs::create_dir_all(&dir).map_err(store_err(format!("cannot create {}", dir.display())))?;
    let spec_path = dir.join(SPEC_FILE);
    let json = serde_json::to_vec_pretty(spec).expect("a job spec serializes");
    write_atomic(&spec_path, &json)?;
    let script = dir.join(SCRIPT_FILE);
    let text = format!(
        "#!/bin/sh\n# posttrain: build stage `{}` of `{}` ({})\nexec {} build-job {}\n",
        spec.stage,
        spec.experiment,
        spec.identity.key,
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&spec_path.to_string_lossy()),
    );
    write_atomic(&script, text.as_bytes())?;
    Ok(script)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(store_err(format!("cannot write {}", path.display())))
}

/// `'text'` with single quotes escaped, for /bin/sh.
pub fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Build the key a spec file names (the body of `posttrain build-job`).
pub fn build_job(spec_path: &Path, quiet: bool) -> Result<(), RunError> {
    let bad = |message: String| RunError::Job {
        spec: spec_path.to_path_buf(),
        message,
    };
    let bytes = std::fs::read(spec_path).map_err(|e| bad(e.to_string()))?;
    let spec: JobSpec =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a job spec: {e}")))?;
    // STORE/.jobs/<key>/spec.json
    let store_dir = spec_path
        .parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .ok_or_else(|| bad("not inside a store's .jobs folder".into()))?;
    let project = Project {
        root: spec.root.clone(),
        store: Store::new(store_dir),
    };
    let table: toml::Table =
        toml::from_str(&spec.settings).map_err(|e| bad(format!("settings are not TOML: {e}")))?;
    let mut settings = StageSettings::parse(&spec.identity.kind, toml::Value::Table(table))
        .ok_or_else(|| bad(format!("unknown kind `{}`", spec.identity.kind)))?
        .map_err(|e| bad(format!("settings do not parse: {e}")))?;
    // As the experiment's loading does, so the job runs what was planned.
    let kind_of = |name: &str| -> Option<&'static str> {
        let kind = spec.kinds.get(name)?;
        crate::stages::KINDS.iter().copied().find(|k| k == kind)
    };
    crate::experiment::defaults::resolve(&mut settings, &kind_of);
    // The datasets must be what was planned.
    let mut hashes = HashCache::open(&project.store.state_dir());
    for d in &spec.identity.datasets {
        let path = project.root.join(&d.path);
        let now = hashes
            .hash_path(&path)
            .map_err(|e| bad(format!("cannot hash {}: {e}", path.display())))?;
        if now != d.hash {
            return Err(bad(format!(
                "dataset `{}` ({}) changed since this job was planned; nothing was built: run `posttrain run {}` again",
                d.path, d.field, spec.experiment
            )));
        }
    }
    let _ = hashes.save();
    for u in &spec.identity.upstream {
        if !project.store.is_complete(&u.key) {
            return Err(bad(format!(
                "upstream stage `{}` is not in the store ({})",
                u.stage,
                project.store.entry_dir(&u.key).display()
            )));
        }
    }
    let upstream = super::local::upstream_entries(&project, &spec.identity);
    let build = BuildSpec {
        experiment: &spec.experiment,
        stage: &spec.stage,
        seed: spec.seed,
        settings: &settings,
        identity: &spec.identity,
        upstream,
    };
    let console = Console::new(quiet);
    match build_stage(&project, &build, spec.force, &console)? {
        Built::Ran(_) => {}
        Built::Found(_) => console.status(
            "Cached",
            &format!("{} was already in the store", spec.stage),
        ),
    }
    Ok(())
}
