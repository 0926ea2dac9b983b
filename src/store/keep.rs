//! What gc keeps, and gc itself. The kept set is the union of:
//!
//! | source                                                    | option        |
//! |-----------------------------------------------------------|---------------|
//! | the plans of every experiment file of every registered    | always        |
//! | project (as DVC's `gc --workspace`)                        |               |
//! | each experiment's last N finished runs                     | `--last-runs` (1) |
//! | live runs' leases, and leases of runs that ended unfinished | always        |
//! | anything published within DURATION                        | `--older-than` |
//!
//! A project whose root is not reachable from here (another machine, a
//! removed checkout) keeps what its registration recorded, until
//! `--forget ROOT`. gc never guesses: an experiment file that does not load
//! keeps its recorded keys, and a lease it cannot read stops it.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lease::{self, Lease, LeaseScan};
use super::registry::{self, RootRecord};
use super::{GcReport, Store};

#[derive(Debug, Clone)]
pub struct GcOptions {
    pub dry_run: bool,
    /// Remove only entries published longer ago than this.
    pub older_than: Option<Duration>,
    /// Keep the entries of each experiment's last N finished runs.
    pub last_runs: usize,
    /// Project roots to drop from the registry first.
    pub forget: Vec<PathBuf>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            dry_run: false,
            older_than: None,
            last_runs: 1,
            forget: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
pub struct GcOutcome {
    pub report: GcReport,
    pub kept: usize,
    pub projects: usize,
    pub experiments: usize,
    pub live_runs: usize,
    pub ended_runs: usize,
    pub forgotten: usize,
    /// Warnings and explanations, one line each.
    pub notes: Vec<String>,
}

/// Register a run's project and take its lease; call
/// [`RunGuard::finished`] when the run succeeded.
pub struct RunGuard<'a> {
    store: &'a Store,
    root: PathBuf,
    experiment: String,
    file: PathBuf,
    planned: BTreeSet<String>,
    lease: Lease,
}

impl<'a> RunGuard<'a> {
    pub fn begin(
        store: &'a Store,
        root: &Path,
        experiment: &str,
        file: &Path,
        planned: BTreeSet<String>,
    ) -> io::Result<RunGuard<'a>> {
        registry::record(store, root, experiment, file, &planned, None)?;
        let lease = Lease::take(store, experiment, root, &planned)?;
        Ok(RunGuard {
            store,
            root: root.to_path_buf(),
            experiment: experiment.to_string(),
            file: file.to_path_buf(),
            planned,
            lease,
        })
    }

    /// The run finished and used `used`: record it, drop the lease.
    pub fn finished(self, used: &BTreeSet<String>) -> io::Result<()> {
        registry::record(
            self.store,
            &self.root,
            &self.experiment,
            &self.file,
            &self.planned,
            Some(used),
        )?;
        self.lease.finish();
        Ok(())
    }
}

/// Collect garbage in `store`, used from the project at `root`.
pub fn gc(store: &Store, root: &Path, opts: &GcOptions) -> io::Result<GcOutcome> {
    let mut out = GcOutcome::default();
    if !store.dir().is_dir() {
        return Ok(out);
    }
    let _gc = store.gc_lock(true)?;
    for r in &opts.forget {
        let n = registry::forget(store.dir(), r)?;
        if n == 0 {
            out.notes.push(format!(
                "--forget {}: no such project is registered in this store",
                r.display()
            ));
        }
        out.forgotten += n;
    }
    let leases = lease::scan(store.dir(), opts.dry_run)?;
    let keep = keep_set(store, root, &leases, opts, &mut out);
    out.kept = store.keys()?.intersection(&keep).count();
    // A live run may be filling the caches: leave them to a quiet moment.
    let keep_caches = leases.live_runs > 0;
    if keep_caches {
        out.notes.push(format!(
            "{} live run(s): the caches in {} are left as they are",
            leases.live_runs,
            store.cache_dir().display()
        ));
    }
    out.report = store.gc(&keep, opts.older_than, keep_caches, opts.dry_run)?;
    Ok(out)
}

fn keep_set(
    store: &Store,
    current: &Path,
    leases: &LeaseScan,
    opts: &GcOptions,
    out: &mut GcOutcome,
) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    keep.extend(leases.live.iter().cloned());
    keep.extend(leases.ended.iter().cloned());
    out.live_runs = leases.live_runs;
    out.ended_runs = leases.ended_runs;
    if leases.ended_runs > 0 {
        out.notes.push(format!(
            "kept the entries of {} run(s) that ended unfinished in the last {}h (their leases are in {})",
            leases.ended_runs,
            lease::ENDED_GRACE.as_secs() / 3600,
            store.dir().join(lease::LEASES_DIR).display()
        ));
    }
    let here = lease::host_name();
    let current = current
        .canonicalize()
        .unwrap_or_else(|_| current.to_path_buf());
    let mut roots: Vec<RootRecord> = registry::all(store.dir())
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    if !roots.iter().any(|r| r.root == current && r.host == here) {
        roots.push(RootRecord {
            root: current.clone(),
            host: here.clone(),
            ..RootRecord::default()
        });
    }
    let mut hashes = crate::plan::HashCache::open(&store.state_dir());
    for rec in &roots {
        out.projects += 1;
        let reachable = rec.host == here && rec.root.join("experiments").is_dir();
        let recorded_runs = |exp: &registry::ExperimentRecord| {
            exp.runs
                .iter()
                .take(opts.last_runs)
                .flat_map(|r| r.keys.iter().cloned())
                .collect::<Vec<_>>()
        };
        if !reachable {
            let mut n = 0;
            for exp in rec.experiments.values() {
                out.experiments += 1;
                n += exp.planned.len();
                keep.extend(exp.planned.iter().cloned());
                keep.extend(recorded_runs(exp));
            }
            out.notes.push(format!(
                "project {} (host {}) is not reachable from here: kept the {n} entries its experiments last planned\n  help: if it is gone for good: posttrain gc --forget {}",
                rec.root.display(),
                rec.host,
                rec.root.display()
            ));
            continue;
        }
        let mut loaded = BTreeSet::new();
        for name in crate::experiment::available(&rec.root) {
            out.experiments += 1;
            let path = rec.root.join("experiments").join(format!("{name}.toml"));
            let planned = crate::experiment::load(&path, &rec.root)
                .map_err(|e| e.to_string())
                .and_then(|exp| {
                    let plan = crate::plan::make_plan(&exp, &rec.root, store, &mut hashes, None)
                        .map_err(|e| e.to_string())?;
                    Ok((exp.name.clone(), plan))
                });
            match planned {
                Ok((exp_name, plan)) => {
                    keep.extend(plan.stages.iter().map(|s| s.key().to_string()));
                    loaded.insert(exp_name);
                }
                Err(e) => {
                    let first = e.lines().next().unwrap_or_default().to_string();
                    out.notes.push(format!(
                        "experiment {} does not load ({first}): kept what it last planned",
                        path.display()
                    ));
                }
            }
        }
        for (name, exp) in &rec.experiments {
            keep.extend(recorded_runs(exp));
            if !loaded.contains(name) {
                // Renamed, removed or broken: what it last planned stays
                // until its last runs age out.
                if !exp.file.is_file() {
                    continue;
                }
                keep.extend(exp.planned.iter().cloned());
            }
        }
        if opts.last_runs > 0 {
            for r in crate::results::record::all_records(&rec.root.join("results")) {
                keep.extend(r.stages.values().map(|s| s.identity.key.clone()));
            }
        }
    }
    let _ = hashes.save();
    keep
}

/// Parse a duration: `90s`, `30m`, `12h`, `7d`, or seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use e.g. 90s, 30m, 12h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => {
            return Err(format!(
                "`{text}`: unknown unit `{unit}`: use s, m, h, d or w"
            ))
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        assert_eq!(parse_duration("0").unwrap().as_secs(), 0);
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }
}
