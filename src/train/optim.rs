//! AdamW with decoupled weight decay (Loshchilov & Hutter), gradient
//! clipping by global norm, and the learning-rate schedule. Written with
//! tensor ops over runtime-shaped parameters, so it runs on any device.

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::model::params::{is_vector, LlamaParams, Matrix};

/// Optimizer and schedule settings (the `train` table of training stages).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSettings {
    /// Optimizer steps. Default 200.
    pub steps: usize,
    /// Sequences per micro-batch. Default 16.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation). Default 1.
    pub grad_accum: usize,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// Linear warm-up steps from 0 to `lr`. Default 20.
    pub warmup_steps: usize,
    /// After warm-up: "cosine" or "linear" decay to `min_lr_ratio * lr`, or "constant".
    pub schedule: Schedule,
    /// Default 0.1.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay on weight matrices (not norms). Default 0.01.
    pub weight_decay: f64,
    /// Default 0.9.
    pub beta1: f64,
    /// Default 0.95.
    pub beta2: f64,
    /// Default 1e-8.
    pub eps: f64,
    /// Clip the gradient's global L2 norm to this (0 = no clipping). Default 1.0.
    pub max_grad_norm: f64,
    /// Evaluate held-out data every N steps (0 = only at the end). Default 50.
    pub eval_every: usize,
    /// Save a resume snapshot (the whole training state) every N steps;
    /// 0 = every ten minutes. Not in the key (see `train::resume`). Default 0.
    pub checkpoint_every: usize,
    /// LoRA adapters to train instead of the whole model, with their seed:
    /// set from the stage's `lora` field, never written in `train`.
    #[serde(skip)]
    pub lora: Option<(crate::model::lora::LoraSettings, u64)>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            steps: 200,
            batch_size: 16,
            grad_accum: 1,
            lr: 1e-3,
            warmup_steps: 20,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            max_grad_norm: 1.0,
            eval_every: 50,
            checkpoint_every: 0,
            lora: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Linear,
    Constant,
}

impl TrainSettings {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: String| Err((format!("train.{f}"), m));
        if self.steps == 0 {
            return bad("steps", "must be at least 1".into());
        }
        if self.batch_size == 0 || self.grad_accum == 0 {
            return bad(
                "batch_size",
                "batch_size and grad_accum must be at least 1".into(),
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1", "beta1 and beta2 must be in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                format!("must be between 0 and 1, got {}", self.min_lr_ratio),
            );
        }
        Ok(())
    }

    /// These settings with LoRA on (when `lora` is given), seeded by `seed`.
    pub fn with_lora(
        &self,
        lora: Option<&crate::model::lora::LoraSettings>,
        seed: u64,
    ) -> TrainSettings {
        TrainSettings {
            lora: lora.map(|l| (l.clone(), seed)),
            ..self.clone()
        }
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = self.lr * self.min_lr_ratio;
        let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => self.lr - (self.lr - floor) * progress,
            Schedule::Cosine => {
                floor + 0.5 * (self.lr - floor) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// AdamW state: first and second moments per parameter.
pub struct AdamW<D: Device<f32>> {
    m: Vec<Matrix<f32, D>>,
    v: Vec<Matrix<f32, D>>,
    pub step: usize,
}

impl<D: Device<f32>> AdamW<D> {
    pub fn new(params: &LlamaParams<f32, D>) -> Self {
        let zeros = |t: &Matrix<f32, D>| t.device().zeros_like(t.shape());
        let named = params.trainable();
        AdamW {
            m: named.iter().map(|(_, t)| zeros(t)).collect(),
            v: named.iter().map(|(_, t)| zeros(t)).collect(),
            step: 0,
        }
    }

    /// The first and second moments, in `params.trainable()` order.
    #[allow(clippy::type_complexity)]
    pub fn moments(&self) -> (&[Matrix<f32, D>], &[Matrix<f32, D>]) {
        (&self.m, &self.v)
    }

    /// Replace the moments (a resumed stage); shapes as [`AdamW::new`]'s.
    pub fn set_moments(&mut self, m: Vec<Matrix<f32, D>>, v: Vec<Matrix<f32, D>>, step: usize) {
        assert_eq!((m.len(), v.len()), (self.m.len(), self.v.len()));
        self.m = m;
        self.v = v;
        self.step = step;
    }

    /// One update with gradients `grads` (same order as `params.trainable()`),
    /// already scaled by `clip_scale`.
    pub fn update(
        &mut self,
        params: &mut LlamaParams<f32, D>,
        grads: Vec<Matrix<f32, D>>,
        lr: f64,
        s: &TrainSettings,
        clip_scale: f64,
    ) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (s.beta1, s.beta2);
        let bias1 = 1.0 / (1.0 - b1.powi(t));
        let bias2 = 1.0 / (1.0 - b2.powi(t));
        // Every tensor below is owned and unshared where dfdx can reuse its
        // buffer (its element-wise ops write in place into a uniquely held
        // operand), so a step allocates about 3 parameter-sized buffers per
        // parameter instead of one per op.
        let moments = std::mem::take(&mut self.m)
            .into_iter()
            .zip(std::mem::take(&mut self.v));
        let trained = params.trainable_mut().into_iter().zip(grads).zip(moments);
        for (((name, p), g), (m, v)) in trained {
            let g = g * clip_scale as f32;
            let m = m * b1 as f32 + g.clone() * (1.0 - b1) as f32;
            let v = v * b2 as f32 + g.square() * (1.0 - b2) as f32;
            let denom = (v.clone() * bias2 as f32).sqrt() + s.eps as f32;
            let mut step = (m.clone() * bias1 as f32) / denom;
            if s.weight_decay > 0.0 && !is_vector(&name) {
                step = step + p.clone() * s.weight_decay as f32;
            }
            *p = p.clone() - step * lr as f32;
            self.m.push(m);
            self.v.push(v);
        }
    }
}

/// The global L2 norm of a set of gradients.
pub fn global_norm<D: Device<f32>>(grads: &[Matrix<f32, D>]) -> f64 {
    grads
        .iter()
        .map(|g| g.clone().square().sum::<(), Axes2<0, 1>>().as_vec()[0] as f64)
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_the_floor() {
        let s = TrainSettings {
            steps: 110,
            warmup_steps: 10,
            lr: 1.0,
            min_lr_ratio: 0.1,
            ..TrainSettings::default()
        };
        assert!((s.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(60) - 0.55).abs() < 1e-12, "half way: midpoint");
        assert!((s.lr_at(110) - 0.1).abs() < 1e-12);
        let lin = TrainSettings {
            schedule: Schedule::Linear,
            ..s
        };
        assert!((lin.lr_at(60) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_matches_hand_computation() {
        // With m = v = 0, the first bias-corrected step is lr * g / (|g| + eps)
        // plus decoupled decay lr * wd * p.
        let dev = Cpu::default();
        let cfg = crate::model::LlamaConfig::tiny(5, 4, 1, 2, 1);
        let mut p = LlamaParams::<f32, Cpu>::init(&cfg, false, 0, &dev);
        let before: Vec<Vec<f32>> = p.named().iter().map(|(_, t)| t.as_vec()).collect();
        let grads: Vec<Matrix<f32, Cpu>> = p
            .named()
            .iter()
            .map(|(_, t)| {
                let n = t.shape().0 * t.shape().1;
                dev.tensor_from_vec(
                    (0..n)
                        .map(|i| if i % 2 == 0 { 0.5 } else { -2.0 })
                        .collect(),
                    *t.shape(),
                )
            })
            .collect();
        let s = TrainSettings {
            weight_decay: 0.1,
            eps: 0.0,
            ..TrainSettings::default()
        };
        let mut opt = AdamW::new(&p);
        opt.update(&mut p, grads, 0.01, &s, 1.0);
        for ((name, t), old) in p.named().iter().zip(before) {
            let decay = if is_vector(name) { 0.0 } else { 0.1 };
            for (i, (new, old)) in t.as_vec().iter().zip(old).enumerate() {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                let expected = old - 0.01 * (sign + decay * old);
                assert!(
                    (new - expected).abs() < 1e-6,
                    "{name}[{i}]: {new} vs {expected}"
                );
            }
        }
    }
}
