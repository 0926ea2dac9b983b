//! Training: the optimizer and schedule, losses, the metrics log, and one
//! training loop that every training stage drives with its own loss.

pub mod causal_lm;
pub mod dpo;
pub mod group;
pub mod kto;
pub mod losses;
pub mod metrics;
pub mod optim;
pub mod ppo;
pub mod preference;
pub mod reference_free;
pub mod resume;
pub mod reward;
pub mod rollout;

use std::time::Instant;

use dfdx::prelude::*;
use indicatif::ProgressBar;

use crate::model::lora::dropout;
use crate::model::params::Matrix;
use crate::model::{workers, LlamaParams};
use metrics::MetricsLog;
use optim::{global_norm, AdamW, TrainSettings};
use resume::{Checkpoints, LoopState, Restore, Trained};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("training diverged at step {step}: the {what} is {value} (try a lower `train.lr` or a `train.max_grad_norm`)")]
    NonFinite {
        step: usize,
        what: &'static str,
        value: f64,
    },
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::checkpoint::CheckpointError),
    #[error("resume snapshot {}: {message}", path.display())]
    Resume {
        path: std::path::PathBuf,
        message: String,
    },
}

/// The loss of some rows of a micro-batch with its tape: a mean over
/// `units` (trained tokens, pairs), how many tokens it trained on, and
/// extra metrics (means over the same units) to log.
pub struct StepLoss<D: Device<f32>> {
    pub loss: Tensor<(), f32, D, OwnedTape<f32, D>>,
    pub tokens: usize,
    pub units: f64,
    pub extras: Vec<(&'static str, f64)>,
}

/// `Sync` where the workers run closures on two threads (the CPU); any
/// closure with the `cuda` feature.
#[cfg(not(feature = "cuda"))]
pub trait SyncOnCpu: Sync {}
#[cfg(not(feature = "cuda"))]
impl<T: Sync> SyncOnCpu for T {}
#[cfg(feature = "cuda")]
pub trait SyncOnCpu {}
#[cfg(feature = "cuda")]
impl<T> SyncOnCpu for T {}

/// One part's gradients, loss value and statistics.
type PartResult<D> = (
    Vec<Matrix<f32, D>>,
    f64,
    usize,
    f64,
    Vec<(&'static str, f64)>,
);

/// Train `params` for `s.steps` AdamW steps.
///
/// - `draw()` gives the rows of the next micro-batch (`grad_accum` per step);
/// - `loss(params, rows)` is the loss of some of those rows; the parts'
///   gradients are combined weighted by their `units`, which gives exactly
///   the gradient of the whole micro-batch's mean;
/// - `eval(params)` returns held-out metrics, logged every `eval_every` steps and at the end;
/// - `ckpt` saves the whole state now and then, and a build that starts
///   again after a kill goes on from its newest snapshot: the sampler's
///   draws of the steps already done are replayed (they only advance its
///   RNG), so the data order continues exactly.
#[allow(clippy::too_many_arguments)]
pub fn fit<D>(
    params: &mut LlamaParams<f32, D>,
    s: &TrainSettings,
    mut draw: impl FnMut() -> Vec<usize>,
    loss: impl Fn(&LlamaParams<f32, D>, &[usize]) -> Result<StepLoss<D>, TrainError> + SyncOnCpu,
    mut eval: impl FnMut(&LlamaParams<f32, D>) -> Result<Vec<(&'static str, f64)>, TrainError>,
    ckpt: &Checkpoints,
    log: &mut MetricsLog,
    progress: &ProgressBar,
) -> Result<(), TrainError>
where
    D: workers::WorkerDevice + TakeGrad,
{
    if let Some((lora, seed)) = &s.lora {
        if !params.has_lora() {
            params.attach_lora(lora, *seed);
        }
    }
    let dropout_seed = s
        .lora
        .as_ref()
        .filter(|(lora, _)| lora.dropout > 0.0)
        .map(|(_, seed)| *seed);
    let mut opt = AdamW::new(params);
    progress.set_length(s.steps as u64);
    let mut start = 0;
    let restore = &mut [Restore {
        name: "model",
        params: &mut *params,
        opt: &mut opt,
    }];
    if let Some(resumed) = ckpt.load(restore, log)? {
        start = resumed.step;
        for _ in 0..start * s.grad_accum {
            draw();
        }
        progress.set_position(start as u64);
    }
    for step in start..s.steps {
        let clock = Instant::now();
        let lr = s.lr_at(step);

        // Micro-steps: accumulate the gradients of loss / grad_accum.
        let mut acc: Option<Vec<Matrix<f32, D>>> = None;
        let (mut loss_sum, mut tokens) = (0.0f64, 0usize);
        let mut extras: Vec<(&'static str, f64)> = Vec::new();
        for micro in 0..s.grad_accum {
            let rows = draw();
            // The parts of a micro-batch run at once (see model::workers).
            let per = rows.len().div_ceil(workers::WORKERS);
            let params_ref: &LlamaParams<f32, D> = params;
            let parts: Vec<Result<PartResult<D>, TrainError>> =
                workers::map_chunks(&rows, per, |index, part| {
                    // LoRA dropout masks of this part (model::lora::dropout).
                    let part_loss = || loss(params_ref, part);
                    let StepLoss {
                        loss: part_loss,
                        tokens,
                        units,
                        extras,
                    } = match dropout_seed {
                        Some(seed) => {
                            let seed = dropout::part_seed(seed, step, micro, index);
                            dropout::scoped(seed, part_loss)
                        }
                        None => part_loss(),
                    }?;
                    let value = part_loss.as_vec()[0] as f64;
                    Ok((
                        gradients(params_ref, part_loss),
                        value,
                        tokens,
                        units,
                        extras,
                    ))
                });
            let parts = parts.into_iter().collect::<Result<Vec<_>, _>>()?;
            let units: f64 = parts.iter().map(|p| p.3).sum::<f64>().max(1e-12);
            for (grads, value, n, u, more) in parts {
                let w = u / units / s.grad_accum as f64;
                if !value.is_finite() {
                    return Err(TrainError::NonFinite {
                        step,
                        what: "loss",
                        value,
                    });
                }
                loss_sum += value * w;
                tokens += n;
                for (k, v) in more {
                    match extras.iter_mut().find(|(name, _)| *name == k) {
                        Some(slot) => slot.1 += v * w,
                        None => extras.push((k, v * w)),
                    }
                }
                let scaled: Vec<Matrix<f32, D>> = grads.into_iter().map(|g| g * w as f32).collect();
                acc = Some(match acc {
                    None => scaled,
                    Some(a) => a.into_iter().zip(scaled).map(|(x, y)| x + y).collect(),
                });
            }
        }
        let grads = acc.expect("grad_accum >= 1");
        let norm = clipped_step(&mut opt, params, grads, lr, s, step)?;

        // Log.
        let secs = clock.elapsed().as_secs_f64();
        let mut row = vec![
            ("loss", loss_sum),
            ("lr", lr),
            ("grad_norm", norm),
            ("tokens_per_s", tokens as f64 / secs.max(1e-9)),
        ];
        row.extend(extras);
        let last = step + 1 == s.steps;
        if last || (s.eval_every > 0 && (step + 1) % s.eval_every == 0) {
            row.extend(eval(params)?);
        }
        log.log(step + 1, &row)?;
        if ckpt.due(step + 1, s) {
            let models = [Trained {
                name: "model",
                params: &*params,
                opt: &opt,
            }];
            ckpt.save(step + 1, &models, &LoopState::default(), log)?;
        }
        progress.set_position(step as u64 + 1);
        progress.set_message(format!("loss {loss_sum:.4}"));
    }
    Ok(())
}

/// The gradient of `loss` for every trained parameter, in `trainable()`
/// order (with LoRA: the adapters only).
pub(crate) fn gradients<D: TakeGrad>(
    params: &LlamaParams<f32, D>,
    loss: Tensor<(), f32, D, OwnedTape<f32, D>>,
) -> Vec<Matrix<f32, D>> {
    let mut grads = loss.backward();
    params
        .trainable()
        .iter()
        .map(|(_, t)| D::take_grad(&mut grads, t))
        .collect()
}

/// A parameter's gradient out of dfdx's `Gradients` (a zero gradient for a
/// parameter the loss does not reach): the CPU moves the buffer out as it
/// is; other devices copy it.
pub trait TakeGrad: optim::OptimDevice {
    fn take_grad(grads: &mut Gradients<f32, Self>, t: &Matrix<f32, Self>) -> Matrix<f32, Self> {
        grads.try_alloc_for(t).expect("allocate a gradient");
        grads.get(t)
    }
}

impl TakeGrad for Cpu {
    fn take_grad(grads: &mut Gradients<f32, Cpu>, t: &Matrix<f32, Cpu>) -> Matrix<f32, Cpu> {
        let slot = grads.get_or_alloc_mut(t).expect("allocate a gradient");
        let buf: Vec<f32> = std::mem::take(&mut **slot);
        t.device().tensor_from_vec(buf, *t.shape())
    }
}

#[cfg(feature = "cuda")]
impl TakeGrad for dfdx::tensor::Cuda {}

/// Clip `grads` by their global norm (`s.max_grad_norm`) and take one
/// AdamW step; returns the norm before clipping.
pub(crate) fn clipped_step<D: optim::OptimDevice>(
    opt: &mut AdamW<D>,
    params: &mut LlamaParams<f32, D>,
    grads: Vec<Matrix<f32, D>>,
    lr: f64,
    s: &TrainSettings,
    step: usize,
) -> Result<f64, TrainError> {
    let norm = global_norm(&grads);
    if !norm.is_finite() {
        return Err(TrainError::NonFinite {
            step,
            what: "gradient norm",
            value: norm,
        });
    }
    let clip = if s.max_grad_norm > 0.0 && norm > s.max_grad_norm {
        s.max_grad_norm / norm
    } else {
        1.0
    };
    opt.update(params, grads, lr, s, clip);
    Ok(norm)
}

/// Where a LoRA stage keeps its adapter (PEFT's format) beside the merged model.
pub const ADAPTER_DIR: &str = "adapter";

/// Save the final model into `out` (merged, with its adapter in `adapter/`,
/// when trained with LoRA), close the metrics log, and return the
/// last value of every logged metric (the learning rate left out).
pub fn finish<D: Device<f32>>(
    params: &LlamaParams<f32, D>,
    log: MetricsLog,
    out: &std::path::Path,
) -> Result<crate::stages::Metrics, TrainError> {
    if params.has_lora() {
        // Downstream stages read a full model; the adapter is kept beside it.
        crate::model::checkpoint::save(&params.merged(), out)?;
        params.save_adapter("", &out.join(ADAPTER_DIR))?;
    } else {
        crate::model::checkpoint::save(params, out)?;
    }
    let mut metrics = log.finish()?;
    metrics.remove("lr");
    Ok(metrics)
}
