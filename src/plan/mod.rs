//! The plan: the DAG in topological order, every stage's cache key, whether
//! the store already has it, and — when it does not — why it must run,
//! compared with this experiment's last run.

pub mod check_data;
pub mod dag;
pub mod hash;
pub mod key;
pub mod reason;
pub mod recheck;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::experiment::Experiment;
use crate::results::record::RunRecord;
use crate::stages::InputTarget;
use crate::store::Store;
pub use dag::Dag;
pub use hash::HashCache;
pub use reason::Reason;

/// An input stage of a stage, by the field that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamInput {
    pub field: String,
    pub stage: String,
    pub key: String,
}

/// A dataset file or folder a stage reads, with its content hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInput {
    pub field: String,
    pub path: String,
    pub hash: String,
}

/// What determines a stage's output: its key and everything hashed into it.
/// Saved in store manifests and in each experiment's run record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageIdentity {
    pub key: String,
    pub kind: String,
    pub recipe_version: u32,
    pub seed: u64,
    /// Resolved settings, defaults filled in, stage references by name.
    pub settings: Value,
    pub upstream: Vec<UpstreamInput>,
    pub datasets: Vec<DatasetInput>,
}

/// One stage of the plan.
#[derive(Debug, Clone)]
pub struct PlannedStage {
    pub name: String,
    pub identity: StageIdentity,
    /// The store has a complete entry for this key.
    pub cached: bool,
    /// Why the stage must run (empty when cached).
    pub reasons: Vec<Reason>,
}

impl PlannedStage {
    pub fn key(&self) -> &str {
        &self.identity.key
    }
    pub fn kind(&self) -> &str {
        &self.identity.kind
    }
}

pub struct Plan {
    pub dag: Dag,
    /// Stages, upstream before downstream.
    pub stages: Vec<PlannedStage>,
}

/// Why a plan could not be made (a dataset that cannot be hashed).
#[derive(Debug, thiserror::Error)]
#[error("stage `{stage}`: cannot hash dataset `{}`: {source}", path.display())]
pub struct PlanError {
    pub stage: String,
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Compute keys in topological order and compare with the store and the
/// last run record.
pub fn make_plan(
    exp: &Experiment,
    root: &Path,
    store: &Store,
    hashes: &mut HashCache,
    last: Option<&RunRecord>,
) -> Result<Plan, PlanError> {
    let dag = Dag::build(exp).expect("validated when the experiment was loaded");
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut stages = Vec::new();
    for name in dag.order() {
        let stage = &exp.stages[name];
        let mut key_settings = stage.settings.to_json();
        let mut upstream = Vec::new();
        let mut datasets = Vec::new();
        for input in stage.settings.inputs() {
            match &input.target {
                InputTarget::Stage(up) | InputTarget::StageFile { stage: up, .. } => {
                    let up_key = keys[up].clone();
                    if let Some(slot) = key_settings.pointer_mut(&input.pointer) {
                        *slot = Value::String(format!("key:{up_key}"));
                    }
                    upstream.push(UpstreamInput {
                        field: input.field.clone(),
                        stage: up.clone(),
                        key: up_key,
                    });
                }
                InputTarget::Path(rel) => {
                    let path = root.join(rel);
                    let hash = hashes.hash_path(&path).map_err(|source| PlanError {
                        stage: name.clone(),
                        path: path.clone(),
                        source,
                    })?;
                    datasets.push(DatasetInput {
                        field: input.field.clone(),
                        path: rel.clone(),
                        hash,
                    });
                }
            }
        }
        upstream.sort_by(|a, b| a.field.cmp(&b.field));
        datasets.sort_by(|a, b| a.field.cmp(&b.field));
        let up_pairs: Vec<(String, String)> = upstream
            .iter()
            .map(|u| (u.field.clone(), u.key.clone()))
            .collect();
        let data_triples: Vec<(String, String, String)> = datasets
            .iter()
            .map(|d| (d.field.clone(), d.path.clone(), d.hash.clone()))
            .collect();
        let key = key::stage_key(&key::KeyInputs {
            kind: stage.settings.kind(),
            recipe_version: stage.settings.recipe_version(),
            settings: &key_settings,
            upstream: &up_pairs,
            datasets: &data_triples,
            seed: stage.seed,
        });
        keys.insert(name.clone(), key.clone());
        let identity = StageIdentity {
            key,
            kind: stage.settings.kind().to_string(),
            recipe_version: stage.settings.recipe_version(),
            seed: stage.seed,
            settings: stage.settings.to_json(),
            upstream,
            datasets,
        };
        let cached = store.is_complete(&identity.key);
        let reasons = if cached {
            Vec::new()
        } else {
            let previous = last.and_then(|r| r.stages.get(name)).map(|s| &s.identity);
            reason::explain(&identity, previous)
        };
        stages.push(PlannedStage {
            name: name.clone(),
            identity,
            cached,
            reasons,
        });
    }
    Ok(Plan { dag, stages })
}
