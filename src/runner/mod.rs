//! The local executor: plan, then run each stale stage in topological order
//! under its key's lock, publish its output to the store, and write the
//! experiment's result tables.

pub mod build;
pub mod config;
pub mod job;
pub mod local;
pub mod project;
pub mod slurm;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use crate::experiment::Experiment;
use crate::plan::check_data::{self, DataProblem};
use crate::plan::{make_plan, HashCache, Plan, PlanError, PlannedStage, Reason};
use crate::results::record::{RunRecord, StageRecord};
use crate::results::{eval_table, experiment_dir, experiment_plots, runs_table};
use crate::stages::{Metrics, StageError};
use crate::text::did_you_mean;
use build::{Built, Console};
pub use project::Project;
pub use slurm::SlurmConfig;

/// Where stale stages are built.
#[derive(Debug, Clone)]
pub enum Executor {
    /// In this process, at most `jobs` independent stages at once.
    Local { jobs: usize },
    /// One Slurm job per stage, with `afterok` dependencies.
    Slurm(SlurmConfig),
}

impl Default for Executor {
    fn default() -> Self {
        Executor::Local { jobs: 1 }
    }
}

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
    pub executor: Executor,
    /// Slurm: submit and return without waiting for the jobs.
    pub detach: bool,
    /// Build every stage whose datasets are fine, skipping those (and
    /// what depends on them) whose datasets are not.
    pub keep_going: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ran,
    Cached,
    /// Stale, but not run (dry run).
    WouldRun,
    /// Not selected by `--until`.
    Skipped,
    /// Submitted to the cluster, not waited for (`--detach`).
    Submitted,
    /// Not run: a dataset it reads (or an upstream stage's) has a problem
    /// (`--keep-going`).
    Blocked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ran => "ran",
            Status::Cached => "cached",
            Status::WouldRun => "would run",
            Status::Skipped => "skipped",
            Status::Submitted => "submitted",
            Status::Blocked => "blocked",
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
    /// Stages not run for their data (`--keep-going`): why, by stage.
    pub blocked: BTreeMap<String, Vec<String>>,
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
    #[error(transparent)]
    Slurm(#[from] slurm::SlurmError),
    #[error("job {}: {message}", spec.display())]
    Job { spec: PathBuf, message: String },
    #[error("{}", data_problems(.0))]
    Data(Vec<DataProblem>),
}

fn data_problems(problems: &[DataProblem]) -> String {
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    format!(
        "{} dataset problem{} found before anything ran:\n{}\n  help: fix the data (or the stage's `columns`, `split`), or run with --keep-going to build the stages whose data is fine",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" },
        lines.join("\n")
    )
}

impl From<crate::data::DataError> for RunError {
    fn from(e: crate::data::DataError) -> Self {
        RunError::Results(e)
    }
}

pub(crate) fn store_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
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

/// Run an experiment: build every stale stage with the chosen executor;
/// reuse the rest.
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
    let force: BTreeSet<String> = options.force.iter().cloned().collect();
    let stale = |p: &PlannedStage| force.contains(&p.name) || !p.cached;
    let mut blocked = blocked_by_data(&plan, exp, &project.root, &selected, options.keep_going)?;
    let todo: Vec<&PlannedStage> = plan
        .stages
        .iter()
        .filter(|p| selected.contains(&p.name) && stale(p) && !blocked.contains_key(&p.name))
        .collect();

    let console = Console::new(options.quiet);
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
    let mut built = BTreeMap::new();
    let mut submitted = BTreeSet::new();
    if !options.dry_run {
        for p in plan
            .stages
            .iter()
            .filter(|p| selected.contains(&p.name) && !stale(p))
        {
            console.status(
                "Cached",
                &format!("{} ({}) {}", p.name, p.kind(), &p.key()[..12]),
            );
        }
        match &options.executor {
            Executor::Local { jobs } => {
                let builds = local::execute(
                    project,
                    exp,
                    &todo,
                    &force,
                    *jobs,
                    options.keep_going,
                    &console,
                )?;
                built = builds.built;
                // --keep-going: a failed stage and what reads it are not
                // built; the rest is, and the run still fails.
                for (name, error) in builds.failed {
                    blocked.insert(name, vec![format!("failed: {error}")]);
                }
                for p in &plan.stages {
                    let ups: Vec<String> = p
                        .identity
                        .upstream
                        .iter()
                        .filter(|u| blocked.contains_key(&u.stage))
                        .map(|u| format!("upstream stage `{}` did not build", u.stage))
                        .collect();
                    if !ups.is_empty() && !built.contains_key(&p.name) {
                        blocked.entry(p.name.clone()).or_insert(ups);
                    }
                }
            }
            Executor::Slurm(config) => {
                let run = slurm::SlurmRun {
                    project,
                    exp,
                    config,
                    console: &console,
                    force: &force,
                };
                match run.execute(&todo, options.detach)? {
                    slurm::Outcome::Built(b) => built = b,
                    slurm::Outcome::Submitted(names) => submitted = names,
                }
            }
        }
    }

    let mut outcomes = Vec::new();
    let mut record_stages = BTreeMap::new();
    for planned in &plan.stages {
        let name = &planned.name;
        let mut outcome = StageOutcome {
            name: name.clone(),
            kind: planned.kind().to_string(),
            key: planned.key().to_string(),
            status: Status::Cached,
            duration_s: 0.0,
            metrics: Metrics::new(),
            reasons: if force.contains(name) {
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
        if blocked.contains_key(name) && stale(planned) {
            outcome.status = Status::Blocked;
            outcomes.push(outcome);
            continue;
        }
        if options.dry_run || submitted.contains(name) {
            outcome.status = match (stale(planned), options.dry_run) {
                (false, _) => Status::Cached,
                (true, true) => Status::WouldRun,
                (true, false) => Status::Submitted,
            };
            outcomes.push(outcome);
            continue;
        }
        let key = planned.key();
        let manifest = match built.remove(name) {
            Some(Built::Ran(m)) => {
                outcome.status = Status::Ran;
                outcome.duration_s = m.duration_s;
                m
            }
            Some(Built::Found(m)) => m,
            None => project
                .store
                .manifest(key)
                .ok_or_else(|| RunError::NotBuilt {
                    stage: name.clone(),
                    experiment: exp.name.clone(),
                })?,
        };
        outcome.metrics = manifest.metrics.clone();
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
        let used = if submitted.is_empty() {
            let used = record_stages
                .values()
                .map(|s| s.identity.key.clone())
                .collect();
            write_results(project, exp, &plan, record_stages, &results_dir)?;
            used
        } else {
            // Detached: the jobs build the plan's keys after this exits.
            plan.stages.iter().map(|s| s.key().to_string()).collect()
        };
        guard
            .finished(&used)
            .map_err(store_err("cannot record this run in the store"))?;
    }
    Ok(RunReport {
        experiment: exp.name.clone(),
        stages: outcomes,
        results_dir,
        blocked,
    })
}

/// The stale selected stages that cannot run because a dataset they read,
/// or one an upstream stage reads, has a problem (by stage: the problems).
/// Without `keep_going`, any problem stops the run before anything builds.
fn blocked_by_data(
    plan: &Plan,
    exp: &Experiment,
    root: &std::path::Path,
    selected: &BTreeSet<String>,
    keep_going: bool,
) -> Result<BTreeMap<String, Vec<String>>, RunError> {
    let problems: Vec<DataProblem> = check_data::check(exp, root)
        .into_iter()
        .filter(|p| selected.contains(&p.stage))
        .collect();
    if problems.is_empty() {
        return Ok(BTreeMap::new());
    }
    if !keep_going {
        return Err(RunError::Data(problems));
    }
    let mut blocked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in problems {
        blocked
            .entry(p.stage.clone())
            .or_default()
            .push(p.to_string());
    }
    // Upstream first: a stage reading a blocked stage is blocked too.
    for s in &plan.stages {
        let ups: Vec<String> = s
            .identity
            .upstream
            .iter()
            .filter(|u| blocked.contains_key(&u.stage))
            .map(|u| format!("upstream stage `{}` is blocked", u.stage))
            .collect();
        if !ups.is_empty() {
            blocked.entry(s.name.clone()).or_default().extend(ups);
        }
    }
    Ok(blocked)
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
