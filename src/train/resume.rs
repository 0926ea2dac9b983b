//! Resumable training. A training stage saves its whole state (every
//! model's weights and AdamW moments, the step, its own loop state such as
//! RNG streams and the prompt order, and the metric rows so far) every
//! `checkpoint_every` steps, or every ten minutes when that is 0, into its
//! key's resume folder. A build of the same key that starts later (after a
//! kill -9, a Slurm TIMEOUT or a requeue) loads the newest snapshot and goes
//! on, ending with the same bytes as a run that was never interrupted.
//!
//! A resume folder (`STORE/.resume/<key>/`, owned by the runner):
//!
//! ```text
//! step-00000120/         one complete snapshot
//!   state.json           step, loop state, metric rows (floats as bit patterns)
//!   NAME.safetensors     per model: `param/…`, `m/…`, `v/…` tensors
//! LATEST                 the name of the newest complete snapshot
//! ```
//!
//! A snapshot is written under a temporary name and renamed into place;
//! `LATEST` is replaced by a rename after that, so a kill at any point
//! leaves the previous snapshot usable. Checkpoints are not in the key and
//! never part of the published entry.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dfdx::prelude::*;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use super::metrics::MetricsLog;
use super::optim::{AdamW, TrainSettings};
use super::TrainError;
use crate::model::checkpoint::{f32_matrix, f32_safetensors, NamedTensor};
use crate::model::params::Matrix;
use crate::model::LlamaParams;

/// With `checkpoint_every = 0`: a snapshot once this much time has passed
/// since the last one (or since the start).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);

/// Fault injection for tests: after this many snapshots the process sends
/// itself SIGKILL (exactly what `kill -9` does, at a known point).
pub const KILL_AFTER_ENV: &str = "POSTTRAIN_FAULT_KILL_AFTER_CHECKPOINTS";

const LATEST: &str = "LATEST";
const STATE: &str = "state.json";

/// When and where a training loop saves its state.
pub struct Checkpoints {
    dir: Option<PathBuf>,
    interval: Duration,
    last: Cell<Instant>,
    saved: Cell<usize>,
    kill_after: Option<usize>,
}

/// A model a loop trains, with its optimizer, under a file name.
pub struct Trained<'a, D: Device<f32>> {
    pub name: &'static str,
    pub params: &'a LlamaParams<f32, D>,
    pub opt: &'a AdamW<D>,
}

/// The same, to restore into.
pub struct Restore<'a, D: Device<f32>> {
    pub name: &'static str,
    pub params: &'a mut LlamaParams<f32, D>,
    pub opt: &'a mut AdamW<D>,
}

/// What a loaded snapshot gives back besides the models.
pub struct Resumed {
    /// Optimizer steps already done.
    pub step: usize,
    /// The loop's own state, as it saved it.
    pub state: LoopState,
}

/// A loop's own state: named integers and floats (kept exactly).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoopState {
    pub ints: BTreeMap<String, u64>,
    /// Floats as IEEE-754 bit patterns, so they come back exactly.
    floats: BTreeMap<String, u64>,
    pub lists: BTreeMap<String, Vec<u64>>,
}

impl LoopState {
    pub fn set_float(&mut self, name: &str, value: f64) {
        self.floats.insert(name.to_string(), value.to_bits());
    }
    pub fn float(&self, name: &str) -> Option<f64> {
        self.floats.get(name).map(|b| f64::from_bits(*b))
    }
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    step: usize,
    state: LoopState,
    /// Metric rows, each as (name, f64 bits).
    rows: Vec<BTreeMap<String, u64>>,
    /// AdamW's step count per model.
    opt_steps: BTreeMap<String, usize>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Resume {
        path: path.to_path_buf(),
        message: source.to_string(),
    }
}

impl Checkpoints {
    /// Snapshots into `dir` (none when `None`).
    pub fn new(dir: Option<&Path>) -> Checkpoints {
        Checkpoints {
            dir: dir.map(Path::to_path_buf),
            interval: DEFAULT_INTERVAL,
            last: Cell::new(Instant::now()),
            saved: Cell::new(0),
            kill_after: std::env::var(KILL_AFTER_ENV)
                .ok()
                .and_then(|v| v.parse().ok()),
        }
    }

    /// No snapshots at all (library callers, tests of the loops).
    pub fn disabled() -> Checkpoints {
        Checkpoints {
            dir: None,
            interval: DEFAULT_INTERVAL,
            last: Cell::new(Instant::now()),
            saved: Cell::new(0),
            kill_after: None,
        }
    }

    /// Whether to snapshot after `done` steps: every `s.checkpoint_every`
    /// steps, or every [`DEFAULT_INTERVAL`] when that is 0; never after the
    /// last step (the published model is the final state).
    pub fn due(&self, done: usize, s: &TrainSettings) -> bool {
        if self.dir.is_none() || done >= s.steps {
            return false;
        }
        if s.checkpoint_every > 0 {
            return done.is_multiple_of(s.checkpoint_every);
        }
        self.last.get().elapsed() >= self.interval
    }

    /// Save a snapshot after `step` steps.
    pub fn save<D: Device<f32>>(
        &self,
        step: usize,
        models: &[Trained<D>],
        state: &LoopState,
        log: &MetricsLog,
    ) -> Result<(), TrainError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let name = format!("step-{step:08}");
        let tmp = dir.join(format!("{name}.tmp.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let mut opt_steps = BTreeMap::new();
        for model in models {
            let path = tmp.join(format!("{}.safetensors", model.name));
            write_model(&path, model.params, model.opt)?;
            opt_steps.insert(model.name.to_string(), model.opt.step);
        }
        let file = SnapshotFile {
            step,
            state: state.clone(),
            rows: log
                .history()
                .iter()
                .map(|r| r.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect())
                .collect(),
            opt_steps,
        };
        let path = tmp.join(STATE);
        let json = serde_json::to_vec(&file).expect("snapshot state serializes");
        write_synced(&path, &json)?;
        sync_dir(&tmp);
        let target = dir.join(&name);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(&tmp, &target).map_err(io(&target))?;
        let latest_tmp = dir.join(format!("{LATEST}.tmp.{}", std::process::id()));
        write_synced(&latest_tmp, name.as_bytes())?;
        std::fs::rename(&latest_tmp, dir.join(LATEST)).map_err(io(dir))?;
        sync_dir(dir);
        // Older snapshots are no longer needed.
        if let Ok(read) = std::fs::read_dir(dir) {
            for entry in read.flatten() {
                let other = entry.file_name().to_string_lossy().into_owned();
                if other.starts_with("step-") && other != name && !other.contains(".tmp.") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        self.last.set(Instant::now());
        self.saved.set(self.saved.get() + 1);
        if self.kill_after == Some(self.saved.get()) {
            kill_self();
        }
        Ok(())
    }

    /// Load the newest snapshot into `models` and replay its metric rows
    /// into `log`; `None` when there is none (a fresh start).
    pub fn load<D: Device<f32>>(
        &self,
        models: &mut [Restore<D>],
        log: &mut MetricsLog,
    ) -> Result<Option<Resumed>, TrainError> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let Ok(name) = std::fs::read_to_string(dir.join(LATEST)) else {
            return Ok(None);
        };
        let snap = dir.join(name.trim());
        let path = snap.join(STATE);
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let file: SnapshotFile =
            serde_json::from_slice(&bytes).map_err(|e| TrainError::Resume {
                path: path.clone(),
                message: format!("not a snapshot: {e}"),
            })?;
        for model in models.iter_mut() {
            let path = snap.join(format!("{}.safetensors", model.name));
            let opt_step = *file
                .opt_steps
                .get(model.name)
                .ok_or_else(|| TrainError::Resume {
                    path: path.clone(),
                    message: format!("the snapshot has no model `{}`", model.name),
                })?;
            read_model(&path, model.params, model.opt, opt_step)?;
        }
        let rows: Vec<BTreeMap<String, f64>> = file
            .rows
            .iter()
            .map(|r| {
                r.iter()
                    .map(|(k, b)| (k.clone(), f64::from_bits(*b)))
                    .collect()
            })
            .collect();
        log.replay(&rows)?;
        self.last.set(Instant::now());
        Ok(Some(Resumed {
            step: file.step,
            state: file.state,
        }))
    }
}

fn kill_self() {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid; no memory is touched.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort();
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_model<D: Device<f32>>(
    path: &Path,
    params: &LlamaParams<f32, D>,
    opt: &AdamW<D>,
) -> Result<(), TrainError> {
    let (m, v) = opt.moments();
    let mut tensors: Vec<NamedTensor<D>> = Vec::new();
    for (i, (name, t)) in params.trainable().into_iter().enumerate() {
        let (r, c) = *t.shape();
        tensors.push((format!("param/{name}"), vec![r, c], t));
        tensors.push((format!("m/{name}"), vec![r, c], &m[i]));
        tensors.push((format!("v/{name}"), vec![r, c], &v[i]));
    }
    let bytes = f32_safetensors(path, &tensors)?;
    write_synced(path, &bytes)
}

fn read_model<D: Device<f32>>(
    path: &Path,
    params: &mut LlamaParams<f32, D>,
    opt: &mut AdamW<D>,
    opt_step: usize,
) -> Result<(), TrainError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let bad = |message: String| TrainError::Resume {
        path: path.to_path_buf(),
        message,
    };
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let get = |name: &str, like: &Matrix<f32, D>| f32_matrix(&st, path, name, like);
    let (mut m, mut v) = (Vec::new(), Vec::new());
    {
        let (m0, v0) = opt.moments();
        for (i, (name, p)) in params.trainable_mut().into_iter().enumerate() {
            *p = get(&format!("param/{name}"), p)?;
            m.push(get(&format!("m/{name}"), &m0[i])?);
            v.push(get(&format!("v/{name}"), &v0[i])?);
        }
    }
    opt.set_moments(m, v, opt_step);
    Ok(())
}
