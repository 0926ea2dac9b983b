//! Building one stage's key into the store: take the key's lock, reuse an
//! entry another run finished meanwhile, else build in a temporary folder
//! (resuming from the key's snapshot if a killed build left one) and
//! publish. The local executor and a Slurm job both come through here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use super::{store_err, Project, RunError};
use crate::plan::{HashCache, StageIdentity};
use crate::stages::{StageContext, StageSettings};
use crate::store::{BuiltBy, Manifest};

/// Everything that determines what a build writes, and for whom.
pub struct BuildSpec<'a> {
    pub experiment: &'a str,
    pub stage: &'a str,
    pub seed: u64,
    pub settings: &'a StageSettings,
    pub identity: &'a StageIdentity,
    /// Store entry of every upstream stage, by stage name.
    pub upstream: BTreeMap<String, PathBuf>,
}

/// How a build went.
pub enum Built {
    /// Built here, taking this long.
    Ran(Manifest),
    /// Another run (or job) published it while this one waited.
    Found(Manifest),
}

/// Where builds print: one line per event, above any progress bars.
#[derive(Clone)]
pub struct Console {
    pub bars: MultiProgress,
    pub quiet: bool,
}

impl Console {
    pub fn new(quiet: bool) -> Console {
        Console {
            bars: MultiProgress::new(),
            quiet,
        }
    }

    /// `{:>12} message`, as cargo prints its status lines.
    pub fn status(&self, word: &str, message: &str) {
        if !self.quiet {
            self.bars.suspend(|| eprintln!("{word:>12} {message}"));
        }
    }

    pub fn warn(&self, message: &str) {
        self.bars.suspend(|| eprintln!("warning: {message}"));
    }
}

/// Build `spec`'s key unless the store has it (with `force`, build anyway).
pub fn build_stage(
    project: &Project,
    spec: &BuildSpec,
    force: bool,
    console: &Console,
) -> Result<Built, RunError> {
    let key = spec.identity.key.as_str();
    let name = spec.stage;
    let short = &key[..12];
    if !force {
        if let Some(m) = project.store.manifest(key) {
            return Ok(Built::Found(m));
        }
    }
    let _lock = project
        .store
        .lock(key, || {
            console.status(
                "Waiting",
                &format!("for another run building `{name}` ({short})"),
            )
        })
        .map_err(store_err(format!("cannot lock {key}")))?;
    // Another run may have built it while we waited.
    if !force {
        if let Some(m) = project.store.manifest(key) {
            return Ok(Built::Found(m));
        }
        if let Some(problem) = project.store.problem(key) {
            console.warn(&format!(
                "store entry {key} for `{name}` is incomplete or corrupt ({problem}); rebuilding it"
            ));
        }
    }
    build_locked(project, spec, force, console).map(Built::Ran)
}

/// Build into a temporary folder and publish; the key's lock is held.
fn build_locked(
    project: &Project,
    spec: &BuildSpec,
    force: bool,
    console: &Console,
) -> Result<Manifest, RunError> {
    let name = spec.stage;
    let key = spec.identity.key.as_str();
    let kind = spec.settings.kind();
    let staging = project
        .store
        .begin(key)
        .map_err(store_err(format!("cannot create a build folder for {key}")))?;
    console.status("Running", &format!("{name} ({kind}) {}", &key[..12]));
    let progress = if console.quiet {
        ProgressBar::hidden()
    } else {
        let bar = console.bars.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} {pos}/{len} {elapsed}")
                .expect("valid template"),
        );
        bar.set_prefix(format!("{name} ({kind})"));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    };
    let dataset_changed = |cause| RunError::DatasetChanged {
        stage: name.to_string(),
        cause,
    };
    let mut hashes = HashCache::open(&project.store.state_dir());
    let snapshot = crate::plan::recheck::before_run(&project.root, spec.identity, &mut hashes)
        .map_err(dataset_changed)?;
    let _ = hashes.save();
    let started = crate::time::unix_now();
    let clock = Instant::now();
    let resume_dir = project.store.resume_dir(key);
    if force {
        // A forced rebuild starts from scratch.
        let _ = std::fs::remove_dir_all(&resume_dir);
    } else if resume_dir.join("LATEST").exists() {
        console.status(
            "Resuming",
            &format!("{name} from its last snapshot in {}", resume_dir.display()),
        );
    }
    let ctx = StageContext {
        stage: name,
        root: &project.root,
        out_dir: &staging.dir,
        seed: spec.seed,
        cache_dir: &project.store.cache_dir(),
        upstream: &spec.upstream,
        progress: &progress,
        resume_dir: Some(&resume_dir),
    };
    let result = spec.settings.run(&ctx);
    progress.finish_and_clear();
    console.bars.remove(&progress);
    let metrics = result.map_err(|cause| RunError::Stage {
        stage: name.to_string(),
        kind: kind.to_string(),
        cause,
    })?;
    let duration_s = clock.elapsed().as_secs_f64();
    let manifest = Manifest {
        identity: spec.identity.clone(),
        built_by: BuiltBy {
            experiment: spec.experiment.to_string(),
            stage: name.to_string(),
        },
        started: crate::time::rfc3339(started),
        finished: crate::time::rfc3339(crate::time::unix_now()),
        duration_s,
        metrics,
        outputs: Vec::new(),
    };
    crate::plan::recheck::before_publish(&snapshot).map_err(dataset_changed)?;
    let published = manifest.clone();
    project
        .store
        .publish(staging, manifest)
        .map_err(store_err(format!("cannot publish {key}")))?;
    // Published: the snapshots are no longer needed.
    let _ = std::fs::remove_dir_all(&resume_dir);
    console.status("Finished", &format!("{name} in {duration_s:.2}s"));
    Ok(project.store.manifest(key).unwrap_or(published))
}
