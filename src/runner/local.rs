//! The local executor: stale stages built in this process, each as soon as
//! the stages it reads are built, at most `jobs` at once (`--jobs N`).
//! After a failure nothing new starts (what runs finishes) and the first
//! error is returned; with `keep_going`, every stage that does not read a
//! failed one still builds, and the failures come back with the builds.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc;

use super::build::{build_stage, BuildSpec, Built, Console};
use super::{Project, RunError};
use crate::experiment::Experiment;
use crate::plan::PlannedStage;

/// What the builds did: the built stages, and (with `keep_going`) the
/// failed ones with their errors, in the order they failed.
pub struct Builds {
    pub built: BTreeMap<String, Built>,
    pub failed: Vec<(String, RunError)>,
}

/// Build `todo` (in plan order, upstream first); `force` names the stages
/// to rebuild even if the store has them.
pub fn execute(
    project: &Project,
    exp: &Experiment,
    todo: &[&PlannedStage],
    force: &BTreeSet<String>,
    jobs: usize,
    keep_going: bool,
    console: &Console,
) -> Result<Builds, RunError> {
    let in_todo: BTreeSet<&str> = todo.iter().map(|p| p.name.as_str()).collect();
    let deps: BTreeMap<&str, BTreeSet<&str>> = todo
        .iter()
        .map(|p| {
            let up = p
                .identity
                .upstream
                .iter()
                .map(|u| u.stage.as_str())
                .filter(|s| in_todo.contains(s))
                .collect();
            (p.name.as_str(), up)
        })
        .collect();
    let mut started: BTreeSet<&str> = BTreeSet::new();
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut built: BTreeMap<String, Built> = BTreeMap::new();
    let mut failed: Vec<(String, RunError)> = Vec::new();
    let jobs = jobs.max(1);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel::<(String, Result<Built, RunError>)>();
        let mut running = 0usize;
        loop {
            while (keep_going || failed.is_empty()) && running < jobs {
                let Some(next) = todo.iter().find(|p| {
                    !started.contains(p.name.as_str())
                        && deps[p.name.as_str()].iter().all(|d| done.contains(*d))
                }) else {
                    break;
                };
                started.insert(next.name.as_str());
                running += 1;
                let tx = tx.clone();
                let stage = &exp.stages[&next.name];
                let forced = force.contains(&next.name);
                scope.spawn(move || {
                    let spec = BuildSpec {
                        experiment: &exp.name,
                        stage: &next.name,
                        seed: stage.seed,
                        settings: &stage.settings,
                        identity: &next.identity,
                        upstream: upstream_entries(project, &next.identity),
                    };
                    let result = build_stage(project, &spec, forced, console);
                    let _ = tx.send((next.name.clone(), result));
                });
            }
            if running == 0 {
                break;
            }
            let (name, result) = rx.recv().expect("a build thread reports");
            running -= 1;
            match result {
                Ok(b) => {
                    done.insert(name.clone());
                    built.insert(name, b);
                }
                Err(e) => {
                    if keep_going {
                        console.status("Failed", &format!("{name}: {e}"));
                    }
                    failed.push((name, e));
                }
            }
        }
    });
    if !keep_going && !failed.is_empty() {
        return Err(failed.remove(0).1);
    }
    Ok(Builds { built, failed })
}

/// Store entry of each stage a stage reads, by stage name.
pub fn upstream_entries(
    project: &Project,
    identity: &crate::plan::StageIdentity,
) -> BTreeMap<String, std::path::PathBuf> {
    identity
        .upstream
        .iter()
        .map(|u| (u.stage.clone(), project.store.entry_dir(&u.key)))
        .collect()
}
