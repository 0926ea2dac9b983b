//! The Slurm executor: each stale stage becomes one batch job
//! (`sbatch --parsable`), depending on its upstream stages' jobs with
//! `--dependency=afterok:` and `--kill-on-invalid-dep=yes`, so a failed
//! stage's downstream jobs never run. A job runs `posttrain build-job` on
//! the spec the run wrote (see [`super::job`]) and publishes into the store,
//! which must live on storage the cluster shares. Claims in the store
//! ([`crate::store::claim`]) make two runs that submit the same stage share
//! one job. `run` then polls `squeue` and shows each stage as queued,
//! running, done; Ctrl-C cancels the jobs it submitted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::build::{Built, Console};
use super::job::{self, JobSpec};
use super::{Project, RunError};
use crate::experiment::Experiment;
use crate::plan::PlannedStage;
use crate::store::claim::{Claim, Claims};

/// Cluster settings: `[slurm]` in the project's `posttrain.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Defaults for stages whose `resources` do not say (else the kind's).
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub time: Option<String>,
    /// More `sbatch` arguments, given as they are (e.g. ["--exclusive"]).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

/// Why the cluster could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SlurmError {
    #[error("the slurm executor needs Slurm's `{0}` on PATH, and it is not there\n  help: run on a cluster login node, or use --executor local")]
    Missing(&'static str),
    #[error("`{command}` failed: {message}")]
    Command { command: String, message: String },
    #[error("stage `{stage}` failed in Slurm job {job} ({state}); log: {}{tail}\n  help: nothing was stored for it; its downstream jobs were cancelled; fix the cause and run again", log.display())]
    JobFailed {
        stage: String,
        job: String,
        state: String,
        log: PathBuf,
        tail: String,
    },
    #[error("interrupted: cancelled {0} job(s) this run submitted")]
    Interrupted(usize),
}

/// What `execute` did.
pub enum Outcome {
    /// Every job finished; the builds by stage.
    Built(BTreeMap<String, Built>),
    /// Submitted and not waited for (`--detach`).
    Submitted(BTreeSet<String>),
}

pub struct SlurmRun<'a> {
    pub project: &'a Project,
    pub exp: &'a Experiment,
    pub config: &'a SlurmConfig,
    pub console: &'a Console,
    pub force: &'a BTreeSet<String>,
}

/// One stage's job as this run tracks it.
struct Tracked {
    stage: String,
    key: String,
    job: String,
    log: PathBuf,
    /// Submitted by this run (else another run's job, shared).
    ours: bool,
    state: String,
    started: Option<Instant>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// States after which a job does nothing more.
const FINAL: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
    "REVOKED",
];

fn is_final(state: &str) -> bool {
    FINAL.contains(&state)
}

pub fn require(tool: &'static str) -> Result<(), SlurmError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
    if found {
        Ok(())
    } else {
        Err(SlurmError::Missing(tool))
    }
}

fn output(cmd: &mut Command) -> Result<String, SlurmError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|e| SlurmError::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(SlurmError::Command {
            command: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The states of some jobs (`squeue -t all`), by id; a job squeue no longer
/// knows is absent.
pub fn job_states(ids: &[&str]) -> BTreeMap<String, String> {
    let mut states = BTreeMap::new();
    if ids.is_empty() {
        return states;
    }
    let parse = |text: &str, states: &mut BTreeMap<String, String>| {
        for line in text.lines() {
            if let Some((id, state)) = line.trim().split_once('|') {
                // "CANCELLED by 0" -> "CANCELLED"
                let state = state.split_whitespace().next().unwrap_or("").to_string();
                states.insert(id.to_string(), state);
            }
        }
    };
    let all = ids.join(",");
    match output(Command::new("squeue").args(["-h", "-t", "all", "-o", "%i|%T", "-j", &all])) {
        Ok(text) => parse(&text, &mut states),
        // One unknown id fails the whole query: ask one by one.
        Err(_) => {
            for id in ids {
                if let Ok(text) = output(
                    Command::new("squeue").args(["-h", "-t", "all", "-o", "%i|%T", "-j", id]),
                ) {
                    parse(&text, &mut states);
                }
            }
        }
    }
    states
}

fn log_tail(path: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(8)..];
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  last lines of the log:\n    {}", tail.join("\n    "))
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// The log file of a stage's job (`%j` becomes the job id).
fn log_pattern(project: &Project, exp: &Experiment, stage: &str) -> PathBuf {
    crate::results::experiment_dir(&project.root, &exp.name)
        .join("slurm")
        .join(format!("{stage}-%j.log"))
}

impl SlurmRun<'_> {
    /// Submit the stages of `todo` (plan order) and, unless `detach`,
    /// wait for every job.
    pub fn execute(&self, todo: &[&PlannedStage], detach: bool) -> Result<Outcome, RunError> {
        require("sbatch")?;
        require("squeue")?;
        require("scancel")?;
        let store = &self.project.store;
        if !store.dir().is_absolute() {
            return Err(RunError::Job {
                spec: store.dir().to_path_buf(),
                message: "the store must be an absolute path for cluster jobs".into(),
            });
        }
        let exe = std::env::current_exe().map_err(|e| RunError::Store {
            context: "cannot find the posttrain binary to run in jobs".into(),
            cause: e,
        })?;
        let claims = Claims::new(store.dir());
        let mut tracked: Vec<Tracked> = Vec::new();
        let mut by_stage: BTreeMap<String, String> = BTreeMap::new();
        for planned in todo {
            let key = planned.key();
            let forced = self.force.contains(&planned.name);
            if !forced && store.is_complete(key) {
                continue;
            }
            let deps: Vec<String> = planned
                .identity
                .upstream
                .iter()
                .filter_map(|u| by_stage.get(&u.stage).cloned())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let t = match self.shared_job(&claims, planned)? {
                Some(t) => t,
                None => self.submit(&claims, planned, &deps, &exe, forced)?,
            };
            by_stage.insert(planned.name.clone(), t.job.clone());
            tracked.push(t);
        }
        if detach {
            let names = tracked.iter().map(|t| t.stage.clone()).collect();
            return Ok(Outcome::Submitted(names));
        }
        self.wait(&claims, &mut tracked)?;
        let mut built = BTreeMap::new();
        for t in &tracked {
            let manifest = store
                .manifest(&t.key)
                .ok_or_else(|| SlurmError::JobFailed {
                    stage: t.stage.clone(),
                    job: t.job.clone(),
                    state: format!("{}, but no store entry", t.state),
                    log: t.log.clone(),
                    tail: log_tail(&t.log),
                })?;
            built.insert(
                t.stage.clone(),
                if t.ours {
                    Built::Ran(manifest)
                } else {
                    Built::Found(manifest)
                },
            );
        }
        Ok(Outcome::Built(built))
    }

    /// A live job another run submitted for this key, if there is one; a
    /// stale claim is removed.
    fn shared_job(
        &self,
        claims: &Claims,
        planned: &PlannedStage,
    ) -> Result<Option<Tracked>, RunError> {
        let key = planned.key();
        let deadline = Instant::now() + Duration::from_secs(30);
        while claims.exists(key) {
            match claims.read(key) {
                Some(c) if !c.job.is_empty() => {
                    let state = job_states(&[c.job.as_str()]).get(&c.job).cloned();
                    if let Some(state) = state.filter(|s| !is_final(s)) {
                        self.console.status(
                            "Shared",
                            &format!(
                                "{} with job {} (submitted by `{}`); log: {}",
                                planned.name,
                                c.job,
                                c.experiment,
                                c.log.display()
                            ),
                        );
                        return Ok(Some(Tracked {
                            stage: planned.name.clone(),
                            key: key.to_string(),
                            job: c.job,
                            log: c.log,
                            ours: false,
                            state,
                            started: None,
                        }));
                    }
                    if self.project.store.is_complete(key) {
                        // Finished while we looked: nothing to wait for.
                        return Ok(Some(Tracked {
                            stage: planned.name.clone(),
                            key: key.to_string(),
                            job: c.job,
                            log: c.log,
                            ours: false,
                            state: "COMPLETED".into(),
                            started: None,
                        }));
                    }
                    claims.remove(key);
                }
                // Being submitted by another run right now: wait for its id.
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                _ => claims.remove(key),
            }
        }
        Ok(None)
    }

    fn submit(
        &self,
        claims: &Claims,
        planned: &PlannedStage,
        deps: &[String],
        exe: &Path,
        forced: bool,
    ) -> Result<Tracked, RunError> {
        let store = &self.project.store;
        let key = planned.key();
        let stage = &self.exp.stages[&planned.name];
        let pattern = log_pattern(self.project, self.exp, &planned.name);
        let mut claim = Claim {
            job: String::new(),
            experiment: self.exp.name.clone(),
            stage: planned.name.clone(),
            log: pattern.clone(),
            host: host(),
            pid: std::process::id(),
            since: crate::time::unix_now() as u64,
        };
        if !claims
            .try_take(key, &claim)
            .map_err(super::store_err(format!("cannot claim {key}")))?
        {
            // Lost a race with another submitter: share its job.
            if let Some(t) = self.shared_job(claims, planned)? {
                return Ok(t);
            }
            claims
                .try_take(key, &claim)
                .map_err(super::store_err(format!("cannot claim {key}")))?;
        }
        let spec = JobSpec {
            experiment: self.exp.name.clone(),
            stage: planned.name.clone(),
            seed: stage.seed,
            settings: toml::to_string(&stage.table).expect("a TOML table serializes"),
            identity: planned.identity.clone(),
            root: self.project.root.clone(),
            force: forced,
            kinds: self
                .exp
                .stages
                .iter()
                .map(|(n, s)| (n.clone(), s.settings.kind().to_string()))
                .collect(),
        };
        let script = job::write(store, &spec, exe)?;
        if let Some(dir) = pattern.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut r = crate::experiment::resources::Resources::default_for(planned.kind());
        if let Some(c) = self.config.cpus {
            r.cpus = c;
        }
        if let Some(m) = &self.config.mem {
            r.mem = m.clone();
        }
        if let Some(t) = &self.config.time {
            r.time = t.clone();
        }
        let r = r.with(&stage.resources);
        let mut cmd = Command::new("sbatch");
        cmd.arg("--parsable")
            .arg(format!(
                "--job-name=posttrain-{}-{}",
                self.exp.name, planned.name
            ))
            .arg(format!("--output={}", pattern.display()))
            .arg("--export=ALL")
            .arg(format!("--chdir={}", self.project.root.display()))
            .arg("--ntasks=1")
            .arg(format!("--cpus-per-task={}", r.cpus))
            .arg(format!("--mem={}", r.mem))
            .arg(format!("--time={}", r.time));
        if r.gpus > 0 {
            cmd.arg(format!("--gres=gpu:{}", r.gpus));
        }
        if let Some(p) = &self.config.partition {
            cmd.arg(format!("--partition={p}"));
        }
        if let Some(a) = &self.config.account {
            cmd.arg(format!("--account={a}"));
        }
        if let Some(q) = &self.config.qos {
            cmd.arg(format!("--qos={q}"));
        }
        if !deps.is_empty() {
            cmd.arg(format!("--dependency=afterok:{}", deps.join(":")))
                .arg("--kill-on-invalid-dep=yes");
        }
        cmd.args(&self.config.sbatch_args).arg(&script);
        let out = match output(&mut cmd) {
            Ok(o) => o,
            Err(e) => {
                claims.remove(key);
                return Err(e.into());
            }
        };
        let job = out.trim().split(';').next().unwrap_or("").to_string();
        let log = PathBuf::from(pattern.to_string_lossy().replace("%j", &job));
        claim.job = job.clone();
        claim.log = log.clone();
        claims
            .update(key, &claim)
            .map_err(super::store_err(format!(
                "cannot record the claim of {key}"
            )))?;
        self.console.status(
            "Submitted",
            &format!(
                "{} ({}) as job {job}{}; log: {}",
                planned.name,
                planned.kind(),
                if deps.is_empty() {
                    String::new()
                } else {
                    format!(" after {}", deps.join(", "))
                },
                log.display()
            ),
        );
        Ok(Tracked {
            stage: planned.name.clone(),
            key: key.to_string(),
            job,
            log,
            ours: true,
            state: "PENDING".into(),
            started: None,
        })
    }

    /// Poll until every job is final; report each change of state.
    fn wait(&self, claims: &Claims, tracked: &mut [Tracked]) -> Result<(), RunError> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            libc::signal(
                libc::SIGINT,
                on_interrupt as *const () as libc::sighandler_t,
            );
        }
        let mut delay = Duration::from_millis(250);
        let result: Result<(), RunError> = loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                // Fresh states: a job that ended since the last poll stays.
                let open: Vec<&str> = tracked
                    .iter()
                    .filter(|t| t.ours && !is_final(&t.state))
                    .map(|t| t.job.as_str())
                    .collect();
                let now = job_states(&open);
                let ours: Vec<&Tracked> = tracked
                    .iter()
                    .filter(|t| t.ours && !is_final(&t.state))
                    .filter(|t| now.get(&t.job).is_none_or(|s| !is_final(s)))
                    .collect();
                let ids: Vec<&str> = ours.iter().map(|t| t.job.as_str()).collect();
                if !ids.is_empty() {
                    let _ = Command::new("scancel").args(&ids).status();
                }
                for t in &ours {
                    claims.release(&t.key, &t.job);
                }
                break Err(SlurmError::Interrupted(ids.len()).into());
            }
            let open: Vec<&str> = tracked
                .iter()
                .filter(|t| !is_final(&t.state))
                .map(|t| t.job.as_str())
                .collect();
            if open.is_empty() {
                break Ok(());
            }
            let states = job_states(&open);
            for t in tracked.iter_mut().filter(|t| !is_final(&t.state)) {
                let state = match states.get(&t.job) {
                    Some(s) => s.clone(),
                    // Purged from squeue: the store says how it ended.
                    None if self.project.store.is_complete(&t.key) => "COMPLETED".into(),
                    None => "FAILED".into(),
                };
                if state == t.state {
                    continue;
                }
                match state.as_str() {
                    "RUNNING" => {
                        t.started = Some(Instant::now());
                        self.console
                            .status("Running", &format!("{} (job {})", t.stage, t.job));
                    }
                    "COMPLETED" => {
                        let secs = self
                            .project
                            .store
                            .manifest(&t.key)
                            .map(|m| m.duration_s)
                            .or(t.started.map(|s| s.elapsed().as_secs_f64()))
                            .unwrap_or(0.0);
                        self.console.status(
                            "Finished",
                            &format!("{} (job {}) in {secs:.1}s", t.stage, t.job),
                        );
                    }
                    s if is_final(s) => {
                        self.console.status(
                            "Failed",
                            &format!("{} (job {}): {s}; log: {}", t.stage, t.job, t.log.display()),
                        );
                    }
                    _ => {}
                }
                t.state = state;
                if is_final(&t.state) && t.ours {
                    claims.release(&t.key, &t.job);
                }
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        };
        // SAFETY: restores the default disposition.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_DFL);
        }
        result?;
        // The first failure upstream-most (plan order) is the cause; the
        // downstream jobs were cancelled because of it.
        if let Some(t) = tracked.iter().find(|t| t.state != "COMPLETED") {
            return Err(SlurmError::JobFailed {
                stage: t.stage.clone(),
                job: t.job.clone(),
                state: t.state.clone(),
                log: t.log.clone(),
                tail: log_tail(&t.log),
            }
            .into());
        }
        Ok(())
    }
}

/// The claimed jobs of some keys and their states: (job, state, log) by key.
pub fn claimed(project: &Project, keys: &[&str]) -> BTreeMap<String, (String, String, PathBuf)> {
    let claims = Claims::new(project.store.dir());
    let held: Vec<(String, Claim)> = keys
        .iter()
        .filter_map(|k| claims.read(k).map(|c| (k.to_string(), c)))
        .filter(|(_, c)| !c.job.is_empty())
        .collect();
    if held.is_empty() || require("squeue").is_err() {
        return BTreeMap::new();
    }
    let ids: Vec<&str> = held.iter().map(|(_, c)| c.job.as_str()).collect();
    let states = job_states(&ids);
    held.into_iter()
        .filter_map(|(k, c)| {
            let state = states.get(&c.job)?.clone();
            Some((k, (c.job, state, c.log)))
        })
        .collect()
}

/// Cancel the live jobs claimed for some keys; returns (stage, job) pairs.
pub fn cancel(project: &Project, keys: &[&str]) -> Result<Vec<(String, String)>, SlurmError> {
    require("scancel")?;
    let claims = Claims::new(project.store.dir());
    let mut cancelled = Vec::new();
    for (key, (job, state, _)) in claimed(project, keys) {
        if is_final(&state) {
            continue;
        }
        output(Command::new("scancel").arg(&job))?;
        let stage = claims.read(&key).map(|c| c.stage).unwrap_or_default();
        claims.release(&key, &job);
        cancelled.push((stage, job));
    }
    Ok(cancelled)
}
