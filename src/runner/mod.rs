//! The local executor: plan, then run each stale stage in topological order
//! under its key's lock, publish its output to the store, and write the
//! experiment's result tables.

pub mod project;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::experiment::Experiment;
use crate::plan::{make_plan, HashCache, Plan, PlanError, Reason};
use crate::results::record::{RunRecord, StageRecord};
use crate::results::{eval_table, experiment_dir, experiment_plots, runs_table};
use crate::stages::{Metrics, StageContext, StageError};
use crate::store::{BuiltBy, Manifest};
use crate::text::did_you_mean;
pub use project::Project;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stages to rebuild even when cached.
    pub force: Vec<String>,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    /// Say what would run, run nothing.
    pub dry_run: bool,
    /// No progress display or status lines.
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ran,
    Cached,
    /// Stale, but not run (dry run).
    WouldRun,
    /// Not selected by `--until`.
    Skipped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::WouldRun => "would run",
            Status::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StageOutcome {
    pub name: String,
    pub kind: String,
    pub key: String,
    pub status: Status,
    pub duration_s: f64,
    pub metrics: Metrics,
    pub reasons: Vec<Reason>,
}

#[derive(Debug)]
pub struct RunReport {
    pub experiment: String,
    pub stages: Vec<StageOutcome>,
    pub results_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("{flag} names stage `{name}`, which is not in experiment `{experiment}`{hint}")]
    UnknownStage {
        flag: &'static str,
        name: String,
        experiment: String,
        hint: String,
    },
    #[error("stage `{stage}` of `{experiment}` is not built for its current settings\n  help: run it first: posttrain run {experiment} --until {stage}")]
    NotBuilt { stage: String, experiment: String },
    // The causes are not `source` fields: the message already holds them,
    // and anyhow's `{:#}` would print them a second time.
    #[error("stage `{stage}` ({kind}) failed: {cause}\n  help: nothing was stored for it; fix the cause and run again")]
    Stage {
        stage: String,
        kind: String,
        cause: StageError,
    },
    #[error("store: {context}: {cause}")]
    Store {
        context: String,
        cause: std::io::Error,
    },
    #[error("stage `{stage}`: {cause}\n  help: nothing was stored for it; run again once the dataset stays put (posttrain plan shows the new key)")]
    DatasetChanged { stage: String, cause: String },
    // Not `#[from]`: a source field would print the cause a second time.
    #[error("cannot write results: {0}")]
    Results(crate::data::DataError),
}

impl From<crate::data::DataError> for RunError {
    fn from(e: crate::data::DataError) -> Self {
        RunError::Results(e)
    }
}

fn store_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let context = context.into();
    move |cause| RunError::Store { context, cause }
}

/// Plan an experiment against the project's store and its last run.
pub fn plan(project: &Project, exp: &Experiment) -> Result<Plan, RunError> {
    let mut hashes = HashCache::open(&project.store.state_dir());
    let last = RunRecord::read(&experiment_dir(&project.root, &exp.name));
    let plan = make_plan(
        exp,
        &project.root,
        &project.store,
        &mut hashes,
        last.as_ref(),
    )?;
    // A cache that cannot be saved only costs a re-hash next time.
    let _ = hashes.save();
    Ok(plan)
}

/// The store folder of a stage's current output (its key must be built).
pub fn stage_output(project: &Project, exp: &Experiment, stage: &str) -> Result<PathBuf, RunError> {
    let plan = plan(project, exp)?;
    let Some(planned) = plan.stages.iter().find(|s| s.name == stage) else {
        return Err(RunError::UnknownStage {
            flag: "the stage argument",
            name: stage.to_string(),
            experiment: exp.name.clone(),
            hint: did_you_mean(stage, exp.stages.keys().map(String::as_str)),
        });
    };
    if !planned.cached {
        return Err(RunError::NotBuilt {
            stage: stage.to_string(),
            experiment: exp.name.clone(),
        });
    }
    Ok(project.store.entry_dir(planned.key()))
}

/// Run an experiment: every stale stage, in order; reuse the rest.
pub fn run(
    project: &Project,
    exp: &Experiment,
    options: &RunOptions,
) -> Result<RunReport, RunError> {
    let plan = plan(project, exp)?;
    let check = |flag: &'static str, name: &str| -> Result<(), RunError> {
        if plan.dag.contains(name) {
            return Ok(());
        }
        Err(RunError::UnknownStage {
            flag,
            name: name.to_string(),
            experiment: exp.name.clone(),
            hint: did_you_mean(name, exp.stages.keys().map(String::as_str)),
        })
    };
    for f in &options.force {
        check("--force", f)?;
    }
    if let Some(u) = &options.until {
        check("--until", u)?;
    }
    let selected: BTreeSet<String> = match &options.until {
        Some(u) => plan.dag.with_ancestors(u),
        None => exp.stages.keys().cloned().collect(),
    };

    // Before any entry is looked at: register the project and lease the
    // plan's keys, so gc keeps them while this run lives (store::keep).
    let guard = if options.dry_run {
        None
    } else {
        let keys = plan.stages.iter().map(|s| s.key().to_string()).collect();
        Some(
            crate::store::keep::RunGuard::begin(
                &project.store,
                &project.root,
                &exp.name,
                &exp.path,
                keys,
            )
            .map_err(store_err("cannot lease this run's entries"))?,
        )
    };
    let results_dir = experiment_dir(&project.root, &exp.name);
    let mut outcomes = Vec::new();
    let mut entries: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut record_stages = BTreeMap::new();
    for planned in &plan.stages {
        let name = &planned.name;
        let forced = options.force.contains(name);
        let mut outcome = StageOutcome {
            name: name.clone(),
            kind: planned.kind().to_string(),
            key: planned.key().to_string(),
            status: Status::Cached,
            duration_s: 0.0,
            metrics: Metrics::new(),
            reasons: if forced {
                vec![Reason::Forced]
            } else {
                planned.reasons.clone()
            },
        };
        if !selected.contains(name) {
            outcome.status = Status::Skipped;
            outcomes.push(outcome);
            continue;
        }
        let stale = forced || !planned.cached;
        if options.dry_run {
            outcome.status = if stale {
                Status::WouldRun
            } else {
                Status::Cached
            };
            outcomes.push(outcome);
            continue;
        }

        let key = planned.key();
        let short = &key[..12];
        let mut manifest = if stale {
            None
        } else {
            project.store.manifest(key)
        };
        if manifest.is_none() {
            let _lock = project
                .store
                .lock(key, || {
                    if !options.quiet {
                        eprintln!(
                            "{:>12} for another run building `{name}` ({short})",
                            "Waiting"
                        );
                    }
                })
                .map_err(store_err(format!("cannot lock {key}")))?;
            // Another run may have built it while we waited.
            manifest = if forced {
                None
            } else {
                project.store.manifest(key)
            };
            if manifest.is_none() {
                if let Some(problem) = project.store.problem(key).filter(|_| !forced) {
                    eprintln!("warning: store entry {key} for `{name}` is incomplete or corrupt ({problem}); rebuilding it");
                }
                let built = build(project, exp, planned, &entries, options)?;
                outcome.status = Status::Ran;
                outcome.duration_s = built.duration_s;
                manifest = Some(built);
            }
        }
        let manifest = manifest.expect("built or found");
        if outcome.status == Status::Cached && !options.quiet {
            eprintln!("{:>12} {name} ({}) {short}", "Cached", planned.kind());
        }
        outcome.metrics = manifest.metrics.clone();
        entries.insert(name.clone(), project.store.entry_dir(key));
        record_stages.insert(
            name.clone(),
            StageRecord {
                identity: planned.identity.clone(),
                status: outcome.status.as_str().to_string(),
                duration_s: outcome.duration_s,
                metrics: manifest.metrics,
                store_path: project.store.entry_dir(key),
            },
        );
        outcomes.push(outcome);
    }

    if let Some(guard) = guard {
        let used = record_stages
            .values()
            .map(|s| s.identity.key.clone())
            .collect();
        write_results(project, exp, &plan, record_stages, &results_dir)?;
        guard
            .finished(&used)
            .map_err(store_err("cannot record this run in the store"))?;
    }
    Ok(RunReport {
        experiment: exp.name.clone(),
        stages: outcomes,
        results_dir,
    })
}

/// Build one stage into a temporary folder and publish it.
fn build(
    project: &Project,
    exp: &Experiment,
    planned: &crate::plan::PlannedStage,
    entries: &BTreeMap<String, PathBuf>,
    options: &RunOptions,
) -> Result<Manifest, RunError> {
    let name = &planned.name;
    let stage = &exp.stages[name];
    let key = planned.key();
    let staging = project
        .store
        .begin(key)
        .map_err(store_err(format!("cannot create a build folder for {key}")))?;
    if !options.quiet {
        eprintln!(
            "{:>12} {name} ({}) {}",
            "Running",
            planned.kind(),
            &key[..12]
        );
    }
    let progress = if options.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix:.bold} {msg} {pos}/{len} {elapsed}")
                .expect("valid template"),
        );
        bar.set_prefix(format!("{name} ({})", planned.kind()));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    };
    if !options.quiet {
        progress.println(format!(
            "{:>12} {name} ({}) {}",
            "Running",
            planned.kind(),
            &key[..12]
        ));
    }
    let dataset_changed = |cause| RunError::DatasetChanged {
        stage: name.clone(),
        cause,
    };
    let mut hashes = HashCache::open(&project.store.state_dir());
    let snapshot = crate::plan::recheck::before_run(&project.root, &planned.identity, &mut hashes)
        .map_err(dataset_changed)?;
    let _ = hashes.save();
    let started = crate::time::unix_now();
    let clock = Instant::now();
    let ctx = StageContext {
        stage: name,
        root: &project.root,
        out_dir: &staging.dir,
        seed: stage.seed,
        cache_dir: &project.store.cache_dir(),
        upstream: entries,
        progress: &progress,
    };
    let result = stage.settings.run(&ctx);
    progress.finish_and_clear();
    let metrics = result.map_err(|cause| RunError::Stage {
        stage: name.clone(),
        kind: planned.kind().to_string(),
        cause,
    })?;
    let duration_s = clock.elapsed().as_secs_f64();
    let manifest = Manifest {
        identity: planned.identity.clone(),
        built_by: BuiltBy {
            experiment: exp.name.clone(),
            stage: name.clone(),
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
    if !options.quiet {
        eprintln!("{:>12} {name} in {duration_s:.2}s", "Finished");
    }
    Ok(project.store.manifest(key).unwrap_or(published))
}

/// `last_run.json`, `runs.parquet` and `stages/NAME` links to store entries.
/// Stages not run this time (`--until`) keep their previous record.
fn write_results(
    project: &Project,
    exp: &Experiment,
    plan: &Plan,
    stages: BTreeMap<String, StageRecord>,
    dir: &std::path::Path,
) -> Result<(), RunError> {
    let ran_any = stages.values().any(|s| s.status == "ran");
    let mut merged = RunRecord::read(dir).map(|r| r.stages).unwrap_or_default();
    merged.retain(|name, _| exp.stages.contains_key(name));
    merged.extend(stages);
    let record = RunRecord {
        experiment: exp.name.clone(),
        file: exp.path.clone(),
        finished: crate::time::rfc3339(crate::time::unix_now()),
        stages: merged,
    };
    record
        .write(dir)
        .map_err(store_err(format!("cannot write {}", dir.display())))?;
    let order: Vec<String> = plan.stages.iter().map(|s| s.name.clone()).collect();
    let mut df = runs_table::runs_frame(&record, &order)?;
    runs_table::write_runs(&mut df, dir)?;
    let mut eval = eval_table::gather(&record, &order)?;
    eval_table::write_eval(eval.as_mut(), dir)?;
    link_entries(project, &record, dir);
    // Plots are redrawn when something ran (a cached run stays fast); a
    // plot that cannot be drawn is a warning, not a failed run.
    let plots = dir.join(experiment_plots::PLOTS_DIR);
    if ran_any || !plots.exists() {
        if let Err(e) = experiment_plots::write_plots(&record, eval.as_ref(), dir) {
            eprintln!("warning: cannot draw the plots in {}: {e}", plots.display());
        }
    }
    Ok(())
}

#[cfg(unix)]
fn link_entries(_project: &Project, record: &RunRecord, dir: &std::path::Path) {
    let links = dir.join("stages");
    let _ = std::fs::remove_dir_all(&links);
    if std::fs::create_dir_all(&links).is_err() {
        return;
    }
    for (name, stage) in &record.stages {
        let target = stage
            .store_path
            .canonicalize()
            .unwrap_or_else(|_| stage.store_path.clone());
        let _ = std::os::unix::fs::symlink(target, links.join(name));
    }
}

#[cfg(not(unix))]
fn link_entries(_project: &Project, _record: &RunRecord, _dir: &std::path::Path) {}
